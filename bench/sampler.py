"""Decode speed of the KV-cache sampler against full recomputation, `small` config.

  python -m bench.sampler                      # from the repo root
  python -m bench.sampler --batches=1,8 --new=128

Prints one line. Both paths are jitted `while_loop`s, compiled before timing
(compile time excluded) and timed with block_until_ready; greedy, no EOS, so
every row makes exactly `--new` tokens. The recompute baseline runs the full
forward (all layers and the output head) over a fixed [B, P + new] buffer for
every token, which is what decoding without a cache costs. tokens/s counts
generated tokens, end to end (prefill included); `decode` excludes prefill.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from deepimagine_jax import model as model_lib
from deepimagine_jax import sampler
from deepimagine_jax.config import ModelConfig

_GREEDY = dict(temperature=0.0, top_k=0, top_p=1.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def recompute_greedy(graphdef, params, prompt_BP, mask_BP, *, max_new_tokens):
  """Greedy decoding without a cache: one full forward per new token."""
  model = nnx.merge(graphdef, params)
  B, Pl = prompt_BP.shape
  N = max_new_tokens
  tokens_BL = jnp.concatenate([prompt_BP, jnp.zeros((B, N), jnp.int32)], axis=1)
  seg_BL = jnp.concatenate([mask_BP, jnp.zeros((B, N), jnp.int32)], axis=1)

  def body(t, carry):
    tokens_BL, seg_BL = carry
    pos_BL = jnp.maximum(jnp.cumsum(seg_BL, axis=1) - 1, 0)
    logits_BLV, _ = model(tokens_BL, pos_BL, segment_ids_BT=seg_BL)
    last_BV = jax.lax.dynamic_index_in_dim(logits_BLV, Pl + t - 1, axis=1, keepdims=False)
    nxt_B1 = jnp.argmax(last_BV, axis=-1).astype(jnp.int32)[:, None]
    tokens_BL = jax.lax.dynamic_update_slice_in_dim(tokens_BL, nxt_B1, Pl + t, axis=1)
    seg_BL = jax.lax.dynamic_update_slice_in_dim(seg_BL, jnp.ones_like(nxt_B1), Pl + t, axis=1)
    return tokens_BL, seg_BL

  tokens_BL, _ = jax.lax.fori_loop(0, N, body, (tokens_BL, seg_BL))
  return tokens_BL[:, Pl:]


def _prompt(batch, length, vocab):
  tok = jax.random.randint(jax.random.key(batch), (batch, length), 1, vocab, jnp.int32)
  return tok, jnp.ones((batch, length), jnp.int32)


def time_cache(graphdef, params, vocab, batch, prompt_len, new, cache_dtype, repeats):
  """(end-to-end seconds, decode seconds, tokens), medians over `repeats` after a warm-up."""
  tok, mask = _prompt(batch, prompt_len, vocab)
  eos, pad = jnp.int32(-1), jnp.int32(0)

  def run():
    t0 = time.perf_counter()
    st = sampler._prefill(graphdef, params, tok, mask, jax.random.key(0), eos, pad, None,
                          max_new_tokens=new, cache_dtype=cache_dtype, group_size=1, **_GREEDY)
    jax.block_until_ready(st)
    t1 = time.perf_counter()
    st = sampler._decode(graphdef, params, st, eos, pad, **_GREEDY)
    out = jax.block_until_ready(
        sampler._finish(st.tokens_BL, st.mask_BC, st.logprobs_BC, st.lengths_B, mask))
    t2 = time.perf_counter()
    assert int(out.lengths.min()) == new
    return t2 - t0, t2 - t1, out.tokens

  run()  # compile
  runs = [run() for _ in range(repeats)]
  return (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs),
          runs[-1][2])


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--new", type=int, default=256)
  ap.add_argument("--prompt", type=int, default=256)
  ap.add_argument("--batches", default="1,8,32")
  ap.add_argument("--ratio_batch", type=int, default=1)
  ap.add_argument("--cache_dtype", default="float32")
  ap.add_argument("--repeats", type=int, default=3, help="timed runs of the cache path")
  args = ap.parse_args()

  cfg = ModelConfig.small()
  graphdef, params = nnx.split(model_lib.Transformer(cfg, nnx.Rngs(0)))
  load0 = os.getloadavg()[0]
  timed = {}  # batch -> (end-to-end s, decode s, tokens)
  batches = [int(x) for x in args.batches.split(",")]
  for b in dict.fromkeys(batches + [args.ratio_batch]):
    timed[b] = time_cache(graphdef, params, cfg.vocab_size, b, args.prompt, args.new,
                          args.cache_dtype, args.repeats)
  parts = [f"B={b}: {b * args.new / timed[b][0]:.0f} tok/s "
           f"(decode {b * (args.new - 1) / timed[b][1]:.0f})" for b in batches]

  b = args.ratio_batch
  total, _, cache_tokens = timed[b]
  tok, mask = _prompt(b, args.prompt, cfg.vocab_size)
  compiled = recompute_greedy.lower(graphdef, params, tok, mask,
                                    max_new_tokens=args.new).compile()
  t0 = time.perf_counter()
  ref_tokens = jax.block_until_ready(compiled(params, tok, mask))
  recompute = time.perf_counter() - t0
  same = bool(jnp.array_equal(ref_tokens, cache_tokens))
  load1 = os.getloadavg()[0]
  print(f"sampler small cpu={jax.device_count()}x{jax.devices()[0].platform} "
        f"prompt={args.prompt} new={args.new} cache={args.cache_dtype} | "
        f"cache vs recompute at B={b}: {b * args.new / total:.1f} vs "
        f"{b * args.new / recompute:.1f} tok/s = {recompute / total:.1f}x "
        f"(same tokens: {same}) | " + " | ".join(parts) +
        f" | load {load0:.1f}->{load1:.1f}")


if __name__ == "__main__":
  main()
