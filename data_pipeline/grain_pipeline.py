"""Grain: Examples -> token batches -> global sharded arrays.

The pipeline knows nothing of the model; only `to_global_arrays` knows the mesh.
Records are Examples, or the rows of a TFDS source (tfds_pairs.load_tfds_source:
mappings whose text comes back as bytes).
Stages (all seeded, all checkpointable through `iterator.get_state()`):

  MapDataset.source(records) -> this host's shard -> shuffle(seed), reseeded
  each epoch -> repeat(num_epochs) -> tokenize + truncate -> [pad | pack] -> batch

A training sequence is `[BOS] + prompt + completion + [EOS]` (with a chat template:
the rendered user turn and generation prompt, then the completion and the end of
turn; the tokenizer says which); the loss covers the completion and EOS only.
Too-long sequences lose prompt tokens from the left (after BOS / the template's
opening) so the completion - and its final DECISION line - survives.

Iterator state is a small dict of ints (JSON-serialisable): `it.get_state()`,
and `it.set_state(state)` on an iterator built with the same records and
arguments resumes exactly (the trainers keep it in their checkpoints).
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Mapping, Sequence

import grain
import grain.experimental as grain_exp
import jax
import numpy as np

from data_pipeline.example import Example

TOKEN_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")
ADAPTER_KEY = "adapter"  # with a route: each token's LoRA adapter (packed rows mix examples)


def _text(x: Any) -> str:
  """TFDS data sources hand back text features as bytes."""
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, np.ndarray) and x.shape == ():
    return _text(x.item())
  return str(x)


def _field(rec: Example | Mapping[str, Any], key: str) -> Any:
  if isinstance(rec, Example):
    return getattr(rec, key)
  if key not in rec:
    raise KeyError(f"example record {_text(rec.get('id', '?'))!r} has no field {key!r}")
  return rec[key]


def sft_tokens(rec: Example | Mapping[str, Any], tokenizer, seq_len: int,
               route: Callable[[str], int] | None = None) -> dict[str, np.ndarray]:
  """One record -> unpadded inputs/targets/loss_mask of length <= seq_len.

  `tokenizer.prompt_ids` gives the prompt's (head, body) - `[BOS]`, or a chat
  template's opening, and the rest - and `tokenizer.completion_ids` the
  completion ending in its EOS / end of turn. With `route` (the record's
  perturbation -> an adapter index, lora.route) every token also carries its
  example's adapter (`adapter`).
  """
  head, body = tokenizer.prompt_ids(_text(_field(rec, "prompt")))
  completion = tokenizer.completion_ids(_text(_field(rec, "completion")))
  tokens = head + body + completion
  mask = [0.0] * (len(head) + len(body)) + [1.0] * len(completion)
  if len(head) > seq_len:
    raise ValueError(f"example record {_text(_field(rec, 'id'))!r}: seq_len {seq_len} cannot "
                     f"hold the prompt's {len(head)} opening tokens")
  if len(tokens) > seq_len + 1:  # drop from the left, after the head
    cut = len(tokens) - (seq_len + 1)
    tokens = tokens[:len(head)] + tokens[len(head) + cut:]
    mask = mask[:len(head)] + mask[len(head) + cut:]
  tokens_T = np.asarray(tokens, np.int32)
  mask_T = np.asarray(mask, np.float32)
  out = {"inputs": tokens_T[:-1], "targets": tokens_T[1:], "loss_mask": mask_T[1:]}
  if route is not None:
    out[ADAPTER_KEY] = np.full(len(tokens_T) - 1, route(_text(_field(rec, "perturbation"))),
                               np.int32)
  return out


def pad_tokens(ex: Mapping[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """Pads one unpacked example to seq_len; positions/segment ids 0 on padding."""
  n = len(ex["inputs"])
  out = {}
  for key, dtype in (("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32)):
    out[key] = np.zeros(seq_len, dtype)
    out[key][:n] = ex[key]
  out["positions"] = np.zeros(seq_len, np.int32)
  out["positions"][:n] = np.arange(n)
  out["segment_ids"] = np.zeros(seq_len, np.int32)
  out["segment_ids"][:n] = 1
  if ADAPTER_KEY in ex:  # one example per row: one adapter per row, the cheaper gather
    out[ADAPTER_KEY] = np.int32(ex[ADAPTER_KEY][0])
  return out


def _rename_packed(ex: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Grain's packer emits per-feature positions/segment ids; keep one pair."""
  out = {
      "inputs": ex["inputs"], "targets": ex["targets"], "loss_mask": ex["loss_mask"],
      "positions": ex["inputs_positions"], "segment_ids": ex["inputs_segment_ids"],
  }
  if ADAPTER_KEY in ex:  # padding after the last segment reads adapter 0, masked out
    out[ADAPTER_KEY] = ex[ADAPTER_KEY]
  return out


def _host_shard(records, shard_index: int | None, shard_count: int | None,
                global_batch_size: int):
  """This host's equal-length slice of the source, and its local batch size."""
  if shard_index is None:
    shard_index = jax.process_index()
  if shard_count is None:
    shard_count = jax.process_count()
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  if global_batch_size % shard_count:
    raise ValueError(f"global batch size {global_batch_size} does not split over "
                     f"{shard_count} hosts")
  ds = grain.MapDataset.source(records)
  n = len(ds)
  per_host = n // shard_count
  if per_host == 0:
    raise ValueError(f"{n} records cannot feed {shard_count} hosts")
  if n % shard_count:
    # Equal lengths keep hosts in step: a host that ran out first would hang
    # the others at the next collective.
    logging.info("grain_pipeline: dropping %d of %d records so %d hosts get equal shards",
                 n % shard_count, n, shard_count)
  ds = ds[shard_index::shard_count][:per_host]
  return ds, global_batch_size // shard_count


def _host_dataset(records, fn, global_batch_size, seed, num_epochs, shard_index, shard_count,
                  read_threads):
  """This host's shard, reshuffled each epoch, mapped by `fn`; and the local batch size."""
  ds, local_bs = _host_shard(records, shard_index, shard_count, global_batch_size)
  ds = ds.shuffle(seed=seed).repeat(num_epochs).map(fn)
  opts = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64)
  return ds.to_iter_dataset(opts), local_bs


def make_sft_iterator(records, tokenizer, *, seq_len: int, global_batch_size: int,
                      seed: int, num_epochs: int | None = None, pack: bool = False,
                      shard_index: int | None = None, shard_count: int | None = None,
                      num_packing_bins: int | None = None,
                      route: Callable[[str], int] | None = None,
                      read_threads: int = 4) -> grain.DatasetIterator:
  """Token batches ([B_local, seq_len], design.md "Token batches") for this host.

  `records` is a sequence of Examples or a TFDS data source of the same.
  `num_epochs=None` repeats forever (trainers stop by step count). With
  `pack=True`, several examples share a row (first-fit packing over
  `num_packing_bins` rows, default the local batch size); hosts may then see
  different batch counts per epoch, so multi-host packed runs should repeat
  forever. With `route` (perturbation -> LoRA adapter index) batches also hold
  `adapter`: [B] each row's example's adapter, or with `pack` [B, seq_len] each token's
  (a row then mixes examples; the model computes every adapter's A for it).
  """
  tokens = functools.partial(sft_tokens, tokenizer=tokenizer, seq_len=seq_len, route=route)
  it_ds, local_bs = _host_dataset(records, tokens, global_batch_size, seed, num_epochs,
                                  shard_index, shard_count, read_threads)
  if pack:
    lengths = {"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len}
    if route is not None:
      lengths[ADAPTER_KEY] = seq_len
    it_ds = grain_exp.FirstFitPackIterDataset(
        it_ds, length_struct=lengths, num_packing_bins=num_packing_bins or local_bs,
        seed=seed, shuffle_bins=True).map(_rename_packed)
  else:
    it_ds = it_ds.map(functools.partial(pad_tokens, seq_len=seq_len))
  return iter(it_ds.batch(local_bs, drop_remainder=True))


def rl_prompt(rec: Example | Mapping[str, Any], tokenizer, prompt_len: int,
              route: Callable[[str], int] | None = None) -> dict[str, Any]:
  """One record -> a left-padded prompt row plus the host-side fields (truncated as sft_tokens);
  with `route`, the row's LoRA adapter (`adapter`)."""
  head, body = tokenizer.prompt_ids(_text(_field(rec, "prompt")))
  if len(head) > prompt_len:
    raise ValueError(f"example record {_text(_field(rec, 'id'))!r}: prompt_len {prompt_len} "
                     f"cannot hold the prompt's {len(head)} opening tokens")
  tokens = head + body[max(0, len(head) + len(body) - prompt_len):]
  row_P = np.full(prompt_len, tokenizer.pad_id, np.int32)
  mask_P = np.zeros(prompt_len, np.int32)
  row_P[prompt_len - len(tokens):] = tokens
  mask_P[prompt_len - len(tokens):] = 1
  out = {"prompt_tokens": row_P, "prompt_mask": mask_P,
         "label": int(_field(rec, "label")), "n_options": len(_field(rec, "options"))}
  if route is not None:
    out[ADAPTER_KEY] = route(_text(_field(rec, "perturbation")))
  return out


def _stack_prompts(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  out = {
      "prompt_tokens": np.stack([r["prompt_tokens"] for r in rows]),
      "prompt_mask": np.stack([r["prompt_mask"] for r in rows]),
      "labels": [r["label"] for r in rows],
      "n_options": [r["n_options"] for r in rows],
  }
  if ADAPTER_KEY in rows[0]:
    out[ADAPTER_KEY] = np.asarray([r[ADAPTER_KEY] for r in rows], np.int32)
  return out


def make_prompt_iterator(records, tokenizer, *, prompt_len: int, batch_size: int,
                         seed: int, num_epochs: int | None = None,
                         shard_index: int | None = None, shard_count: int | None = None,
                         route: Callable[[str], int] | None = None,
                         read_threads: int = 4) -> grain.DatasetIterator:
  """RL prompt batches (design.md "RL prompt batches") for this host.

  `batch_size` is global; each host gets batch_size / hosts rows, and the
  host-side lists (`labels`, `n_options`) describe those rows. With `route`
  (perturbation -> LoRA adapter index) batches also hold `adapter` [B_local].
  """
  prompts = functools.partial(rl_prompt, tokenizer=tokenizer, prompt_len=prompt_len,
                              route=route)
  it_ds, local_bs = _host_dataset(records, prompts, batch_size, seed, num_epochs, shard_index,
                                  shard_count, read_threads)
  return iter(it_ds.batch(local_bs, drop_remainder=True, batch_fn=_stack_prompts))


def to_global_arrays(host_batch: Mapping[str, Any],
                     shardings: Mapping[str, jax.sharding.Sharding]) -> dict[str, Any]:
  """This host's batch -> global jax.Arrays, one `shardings[key]` per array.

  Each host passes only its own rows (the iterators above yield B_local =
  B_global / hosts rows); `jax.make_array_from_process_local_data` places them as
  this host's slice of the global batch, whose shape follows from the sharding:
  the batch axis must be sharded over mesh axes that span the hosts (the data /
  fsdp axes), else every host would have to hold the whole batch. Values that are
  not numpy arrays (host-side lists such as `labels`) pass through unchanged; an
  array without a sharding is a KeyError naming it.
  """
  out = {}
  for key, value in host_batch.items():
    if not isinstance(value, np.ndarray):
      out[key] = value
      continue
    if key not in shardings:
      raise KeyError(f"to_global_arrays: no sharding for batch key {key!r}; "
                     f"shardings has {sorted(shardings)}")
    out[key] = jax.make_array_from_process_local_data(shardings[key], value)
  return out
