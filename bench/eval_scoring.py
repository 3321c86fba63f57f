"""Option scoring: one prompt pass fanned out to the options against one forward per option.

  python bench/eval_scoring.py                     # from the repo root: small, 256-token prompts
  python bench/eval_scoring.py --questions=128 --batch=32 --repeats=3

Prints one line. Both paths take the same random questions: prompts left-padded
to --prompt slots with real lengths drawn in [prompt - 56, prompt], 2- or
3-option questions in turn (3 option slots, the third empty for 2 options, as
eval does), each option's candidate 10-20 tokens right-padded to C = 20.
"after" is `scoring.option_logprobs` (the prompt runs once into a KV cache that
prefix.py fans out to the option slots), --batch questions per call. "before"
runs each real (question, option) pair as its own full sequence [prompt +
candidate] (empty slots skipped, so a 2-option question costs 2 forwards, not
3), batch x 3 rows per call; the output head runs on the candidate positions
only in both. Each path is compiled and run once before timing, then timed over
every batch with block_until_ready, median of --repeats. Examples/s counts
questions. The line also gives the largest log-prob difference between the two
paths. Load averages before and after, as the cores may be shared.
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


def random_questions(n: int, prompt_len: int, vocab: int, seed: int = 0):
  """prompt [Q, P] left-padded, its mask, candidates [Q, 3, C] right-padded, their mask."""
  rng = np.random.default_rng(seed)
  prompt = np.zeros((n, prompt_len), np.int32)
  pmask = np.zeros((n, prompt_len), np.int32)
  cand = np.zeros((n, 3, C_MAX), np.int32)
  cmask = np.zeros((n, 3, C_MAX), np.int32)
  for q in range(n):
    p = int(rng.integers(prompt_len - 56, prompt_len + 1))
    prompt[q, prompt_len - p:] = rng.integers(1, vocab, p)
    pmask[q, prompt_len - p:] = 1
    for o in range(2 + q % 2):
      c = int(rng.integers(C_MIN, C_MAX + 1))
      cand[q, o, :c] = rng.integers(1, vocab, c)
      cmask[q, o, :c] = 1
  return prompt, pmask, cand, cmask


@functools.partial(jax.jit, static_argnames=("graphdef",))
def per_option_logprobs(graphdef, params, seq_RL, mask_RL, cmask_RC):
  """log p(candidate | prompt) of each row [prompt P | candidate C], one full forward per row."""
  model = nnx.merge(graphdef, params)
  C = cmask_RC.shape[1]
  P = seq_RL.shape[1] - C
  positions_RL = jnp.maximum(jnp.cumsum(mask_RL, axis=1) - 1, 0).astype(jnp.int32)
  hidden_RLD, _ = model(seq_RL, positions_RL, segment_ids_BT=mask_RL, return_hidden=True)
  logits_RCV = model.logits(hidden_RLD[:, P - 1:P + C - 1])
  logp_RC = grpo.logprobs_from_logits(logits_RCV, seq_RL[:, P:])
  return jnp.sum(jnp.where(cmask_RC > 0, logp_RC, 0.0), axis=-1)


def per_option_rows(arrays):
  """The real (question, option) pairs as full rows: (sequences, masks, candidate masks, where)."""
  prompt, pmask, cand, cmask = arrays
  where = [(q, o) for q in range(cand.shape[0]) for o in range(cand.shape[1])
           if cmask[q, o].any()]
  seq = np.stack([np.concatenate([prompt[q], cand[q, o]]) for q, o in where])
  mask = np.stack([np.concatenate([pmask[q], cmask[q, o]]) for q, o in where])
  return seq, mask, np.stack([cmask[q, o] for q, o in where]), where


def _batches(arrays, size: int):
  """Fixed-size batches (the last one padded with empty rows): one shape, one compile."""
  n = arrays[0].shape[0]
  for s in range(0, n, size):
    yield [np.concatenate([x[s:s + size], np.zeros((max(0, s + size - n),) + x.shape[1:],
                                                   x.dtype)]) for x in arrays]


def time_path(fn, batches, repeats: int):
  """(median seconds over every batch, outputs of the last run); the first run compiles."""
  batches = [[jnp.asarray(x) for x in b] for b in batches]

  def run():
    t0 = time.perf_counter()
    out = jax.block_until_ready([fn(*b) for b in batches])
    return time.perf_counter() - t0, out

  run()
  runs = [run() for _ in range(repeats)]
  return statistics.median(r[0] for r in runs), [np.asarray(x) for x in runs[-1][1]]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--questions", type=int, default=128)
  ap.add_argument("--batch", type=int, default=32, help="questions per call (eval.batch_size)")
  ap.add_argument("--prompt", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()

  cfg = ModelConfig.small()
  graphdef, params = nnx.split(model_lib.Transformer(cfg, nnx.Rngs(0)))
  arrays = random_questions(args.questions, args.prompt, cfg.vocab_size)
  load0 = os.getloadavg()[0]

  after_s, after = time_path(functools.partial(scoring.option_logprobs, graphdef, params),
                             _batches(arrays, args.batch), args.repeats)
  logp_after = np.concatenate(after)[:args.questions]

  seq, mask, cmask, where = per_option_rows(arrays)
  before_s, before = time_path(functools.partial(per_option_logprobs, graphdef, params),
                               _batches((seq, mask, cmask), args.batch * 3), args.repeats)
  logp_before = np.concatenate(before)[:len(where)]
  diff = max(abs(logp_before[i] - logp_after[q, o]) for i, (q, o) in enumerate(where))
  load1 = os.getloadavg()[0]

  n = args.questions
  print(f"eval scoring small {jax.device_count()}x{jax.devices()[0].platform} "
        f"prompt={args.prompt} options=2-3 x {C_MIN}-{C_MAX} tokens questions={n} "
        f"batch={args.batch} | before (a forward per option, {len(where)} rows): "
        f"{n / before_s:.1f} examples/s | after (one prompt pass, fanned out): "
        f"{n / after_s:.1f} examples/s | {before_s / after_s:.2f}x | "
        f"max |dlogp| {diff:.1e} | load {load0:.1f}->{load1:.1f}")


if __name__ == "__main__":
  main()
