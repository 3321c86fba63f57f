"""Text embeddings from any supported decoder: mean-pooled final hidden states.

The dense retriever of the data build (data.retriever = "dense") calls an
`embed(texts) -> [N, D]` function it is handed; this is that function for a
model the project loads. Texts are tokenized as prompts (BOS, no chat frame),
right-padded to `max_len` tokens (longer texts keep their first `max_len`
tokens: retrieval reads titles and conditions first, and the count of cut texts
is logged), run in fixed batches through one jitted forward (compiled once per
run), and the hidden states of the real tokens averaged.
"""
from __future__ import annotations

import functools
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepimagine_jax import sharding


@functools.partial(jax.jit, static_argnames=("graphdef",))
def mean_hidden(graphdef, params, tokens_BT, mask_BT):
  """Mean of the final (normed) hidden states over each row's real tokens: [B, D] float32."""
  model = nnx.merge(graphdef, params)
  positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32),
                                  tokens_BT.shape)
  hidden_BTD, _ = model(tokens_BT, positions_BT, segment_ids_BT=mask_BT.astype(jnp.int32),
                        return_hidden=True)
  m_BT1 = mask_BT.astype(jnp.float32)[..., None]
  return jnp.sum(hidden_BTD.astype(jnp.float32) * m_BT1, axis=1) / jnp.maximum(
      jnp.sum(m_BT1, axis=1), 1.0)


class Embedder:
  """`embed(texts) -> [N, D]` float32 for the data build's dense retriever."""

  def __init__(self, graphdef, params, tokenizer, *, name: str, max_len: int, batch_size: int):
    if max_len < 2 or batch_size < 1:
      raise ValueError(f"Embedder: max_len ({max_len}) must be >= 2 and batch_size "
                       f"({batch_size}) >= 1")
    self.graphdef, self.params, self.tokenizer = graphdef, params, tokenizer
    self.name, self.max_len, self.batch_size = name, max_len, batch_size

  def __repr__(self) -> str:
    # The build fingerprints its embed function by repr: the same model and settings
    # must give the same string, so a dense build is reused exactly when it may be.
    return (f"Embedder(model={self.name}, max_len={self.max_len}, pooling=mean, "
            f"tokenizer_vocab={self.tokenizer.vocab_size})")

  def tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """Right-padded token rows [N, max_len], their mask, and how many texts were cut."""
    n = len(texts)
    tokens_NT = np.full((n, self.max_len), self.tokenizer.pad_id, np.int32)
    mask_NT = np.zeros((n, self.max_len), np.int32)
    cut = 0
    for i, text in enumerate(texts):
      head, body = self.tokenizer.prompt_ids(text)
      ids = head + body
      cut += len(ids) > self.max_len
      ids = ids[:self.max_len]
      tokens_NT[i, :len(ids)] = ids
      mask_NT[i, :len(ids)] = 1
    return tokens_NT, mask_NT, cut

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    tokens_NT, mask_NT, cut = self.tokens(texts)
    if cut:
      logging.info("embed: %d of %d texts longer than %d tokens keep their first %d",
                   cut, len(texts), self.max_len, self.max_len)
    n, B = len(texts), self.batch_size
    pad = (-n) % B  # fixed batch shape: one compile per run
    tokens_NT = np.concatenate([tokens_NT, np.zeros((pad, self.max_len), np.int32)])
    mask_NT = np.concatenate([mask_NT, np.zeros((pad, self.max_len), np.int32)])
    with sharding.on_params_mesh(self.params):  # each batch split over the devices
      out = [mean_hidden(self.graphdef, self.params, jnp.asarray(tokens_NT[s:s + B]),
                         jnp.asarray(mask_NT[s:s + B])) for s in range(0, n + pad, B)]
    return (np.concatenate([sharding.host_array(x) for x in out])[:n] if out
            else np.zeros((0, 0)))
