"""Option scoring: one prompt pass fanned out to the options against one forward per option.

  python bench/eval_scoring.py                     # from the repo root: small, 256-token prompts
  python bench/eval_scoring.py --slots=448         # prompts padded to eval's data.prompt_len

Prints one line. Both paths take the same random questions: real prompt lengths
drawn in [prompt - 56, prompt], left-padded to --slots; 2- or 3-option questions
in turn (3 option slots, the third empty for 2 options, as eval does), each
option's candidate 10-20 tokens right-padded to C = 20. "after" is
`scoring.batched_option_logprobs`, what evaluation runs: --batch questions per
call, the prompt run once into a KV cache that prefix.py fans out to the option
slots, a batch's shared left padding trimmed to a multiple of 64 slots (nothing
to trim at the default --slots=256). "before" runs each real (question, option)
pair as its own full sequence [prompt slots + candidate] (empty slots skipped,
so a 2-option question costs 2 forwards, not 3), batch x 3 rows per call. The
output head runs on the candidate positions only in both. Each path is compiled
and run once before timing, then timed end to end (every batch dispatched, then
read back), median of --repeats. Examples/s counts questions. The line also
gives the largest log-prob difference between the two paths. Load averages
before and after, as the cores may be shared.
"""
from __future__ import annotations

import argparse
import functools
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from deepimagine_jax import grpo  # noqa: E402
from deepimagine_jax import model as model_lib  # noqa: E402
from deepimagine_jax.config import ModelConfig  # noqa: E402
from deepimagine_jax.eval import scoring  # noqa: E402

C_MIN, C_MAX = 10, 20


def random_questions(n: int, prompt_len: int, slots: int, vocab: int, seed: int = 0):
  """prompt [Q, slots] left-padded, its mask, candidates [Q, 3, C] right-padded, their mask."""
  rng = np.random.default_rng(seed)
  prompt = np.zeros((n, slots), np.int32)
  pmask = np.zeros((n, slots), np.int32)
  cand = np.zeros((n, 3, C_MAX), np.int32)
  cmask = np.zeros((n, 3, C_MAX), np.int32)
  for q in range(n):
    p = int(rng.integers(prompt_len - 56, prompt_len + 1))
    prompt[q, slots - p:] = rng.integers(1, vocab, p)
    pmask[q, slots - p:] = 1
    for o in range(2 + q % 2):
      c = int(rng.integers(C_MIN, C_MAX + 1))
      cand[q, o, :c] = rng.integers(1, vocab, c)
      cmask[q, o, :c] = 1
  return prompt, pmask, cand, cmask


@functools.partial(jax.jit, static_argnames=("graphdef",))
def per_option_logprobs(graphdef, params, seq_BL, mask_BL, cmask_BC):
  """log p(candidate | prompt) of each row [prompt P | candidate C], one full forward per row."""
  model = nnx.merge(graphdef, params)
  C = cmask_BC.shape[1]
  P = seq_BL.shape[1] - C
  positions_BL = jnp.maximum(jnp.cumsum(mask_BL, axis=1) - 1, 0).astype(jnp.int32)
  hidden_BLD, _ = model(seq_BL, positions_BL, segment_ids_BT=mask_BL, return_hidden=True)
  logits_BCV = model.logits(hidden_BLD[:, P - 1:P + C - 1])
  logp_BC = grpo.logprobs_from_logits(logits_BCV, seq_BL[:, P:])
  return jnp.sum(jnp.where(cmask_BC > 0, logp_BC, 0.0), axis=-1)


def per_option_rows(arrays):
  """The real (question, option) pairs as full rows: (sequences, masks, candidate masks, where)."""
  prompt, pmask, cand, cmask = arrays
  where = [(q, o) for q in range(cand.shape[0]) for o in range(cand.shape[1])
           if cmask[q, o].any()]
  seq = np.stack([np.concatenate([prompt[q], cand[q, o]]) for q, o in where])
  mask = np.stack([np.concatenate([pmask[q], cmask[q, o]]) for q, o in where])
  return seq, mask, np.stack([cmask[q, o] for q, o in where]), where


def per_option_path(graphdef, params, rows, batch: int) -> np.ndarray:
  """[rows] log-probs, fixed-size batches (the last padded with empty rows), all dispatched first."""
  n = rows[0].shape[0]
  pending = []
  for s in range(0, n, batch):
    part = [np.concatenate([x[s:s + batch], np.zeros((max(0, s + batch - n),) + x.shape[1:],
                                                    x.dtype)]) for x in rows]
    pending.append(per_option_logprobs(graphdef, params, *map(jnp.asarray, part)))
  return np.concatenate([np.asarray(x) for x in pending])[:n]


def timed(run, repeats: int):
  """(median seconds, output of the last run); the first run compiles."""
  run()
  times, out = [], None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = run()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--questions", type=int, default=128)
  ap.add_argument("--batch", type=int, default=32, help="questions per call (eval.batch_size)")
  ap.add_argument("--prompt", type=int, default=256, help="longest real prompt")
  ap.add_argument("--slots", type=int, default=256, help="prompt slots (padding included)")
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  if args.slots < args.prompt:
    raise SystemExit(f"--slots={args.slots} is shorter than --prompt={args.prompt}")

  cfg = ModelConfig.small()
  graphdef, params = nnx.split(model_lib.Transformer(cfg, nnx.Rngs(0)))
  arrays = random_questions(args.questions, args.prompt, args.slots, cfg.vocab_size)
  load0 = os.getloadavg()[0]

  after_s, logp_after = timed(lambda: scoring.batched_option_logprobs(
      graphdef, params, arrays, batch_size=args.batch, bos_id=1), args.repeats)
  seq, mask, cmask, where = per_option_rows(arrays)
  before_s, logp_before = timed(lambda: per_option_path(
      graphdef, params, (seq, mask, cmask), args.batch * 3), args.repeats)
  diff = max(abs(logp_before[i] - logp_after[q, o]) for i, (q, o) in enumerate(where))
  load1 = os.getloadavg()[0]

  n = args.questions
  print(f"eval scoring small {jax.device_count()}x{jax.devices()[0].platform} "
        f"prompt={args.prompt - 56}-{args.prompt} in {args.slots} slots, options=2-3 x "
        f"{C_MIN}-{C_MAX} tokens, questions={n} batch={args.batch} | before (a forward per "
        f"option, {len(where)} rows): {n / before_s:.2f} examples/s | after (one prompt pass, "
        f"fanned out): {n / after_s:.2f} examples/s | {before_s / after_s:.2f}x | "
        f"max |dlogp| {diff:.1e} | load {load0:.1f}->{load1:.1f}")


if __name__ == "__main__":
  main()
