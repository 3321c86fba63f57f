"""How fast a decode step's matmuls can run on this machine: weights in cache vs streamed.

  python bench/decode_bound.py            # the `small` model, 16 rows (32 samples on 2 cores)
  python bench/decode_bound.py --rows=32

A decode step multiplies a few rows by every weight matrix of the model once. When the
weights do not fit a core's own cache, each step reads them from the shared L3 or from
memory, and that, not the arithmetic, sets the step's pace. This bench measures it on one
core (the process is pinned to one core before JAX starts): the f32 matmul peak (n = 1024,
the faster of a timing before and one after the rest), then a chain of [rows, D] x [D, F]
matmuls (the MLP's shape) whose weights fit in --cache_mib (default 1 MiB, this CPU's L2
per core), then the same chain whose weights total the model's weight bytes (every matrix
of ModelConfig.small, the embedding that doubles as the output head included). One line:
the rates and their ratio to the peak, from the same run. bench/rl_step.py's sample
stage reads the weights this way at each of its 63 decode steps, one copy per device.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__" and hasattr(os, "sched_setaffinity"):
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, before JAX's threads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import rl_step  # noqa: E402
from deepimagine_jax.config import ModelConfig  # noqa: E402


def weight_bytes(cfg: ModelConfig) -> int:
  """float32 bytes of the model's matrices: those one token's forward multiplies by (each
  weight once, 2 FLOPs: rl_step.forward_flops), plus an untied embedding table."""
  table = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
  return 4 * (rl_step.forward_flops(cfg, tokens=1, key_pairs=0, head_tokens=1) // 2 + table)


def chain_rate(rows: int, d: int, f: int, n_mats: int) -> float:
  """FLOP/s of x [rows, d] times n_mats distinct [d, f] matrices in turn, inside one jit
  (a scan, so no dispatch between them); best of 7 x 20 calls after a warm-up."""
  w_NDF = jax.random.normal(jax.random.key(0), (n_mats, d, f), jnp.float32)
  x_RD = jax.random.normal(jax.random.key(1), (rows, d), jnp.float32)

  @jax.jit
  def chain(x_RD, w_NDF):
    def step(x_RD, w_DF):
      y_RF = jnp.dot(x_RD, w_DF)
      return y_RF[:, :d], y_RF[0, 0]  # the next input: this output's first d columns
    return jax.lax.scan(step, x_RD, w_NDF)[1]

  jax.block_until_ready(chain(x_RD, w_NDF))
  best = float("inf")
  for _ in range(7):
    start = time.perf_counter()
    for _ in range(20):
      out = chain(x_RD, w_NDF)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / 20)
  return 2.0 * rows * d * f * n_mats / best


def peak_rate(n: int) -> float:
  """The f32 n x n matmul's FLOP/s (rl_step.make_peak), best of 10."""
  seconds = rl_step.make_peak(n, jnp.float32)
  return 2.0 * n**3 / min(seconds() for _ in range(10))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rows", type=int, default=16,
                  help="rows per device: bench/rl_step.py's 8 x 4 samples over 2 cores")
  ap.add_argument("--matmul_n", type=int, default=1024)
  ap.add_argument("--cache_mib", type=float, default=1.0,
                  help="the weights of the first chain fit in this (a core's own cache)")
  args = ap.parse_args()
  cfg = ModelConfig.small()
  D, F = cfg.d_model, cfg.mlp_dim
  mat_bytes = 4 * D * F
  model_bytes = weight_bytes(cfg)
  in_cache = max(1, int(args.cache_mib * 2**20) // mat_bytes)
  streamed = -(-model_bytes // mat_bytes)
  peak = peak_rate(args.matmul_n)
  cached = chain_rate(args.rows, D, F, in_cache)
  stream = chain_rate(args.rows, D, F, streamed)
  peak = max(peak, peak_rate(args.matmul_n))  # before and after the chains: the faster
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  print(f"decode_bound small rows={args.rows} [{args.rows},{D}]x[{D},{F}] on {cores} "
        f"{jax.devices()[0].platform} core(s) | peak {peak / 1e9:.1f} GFLOP/s (n={args.matmul_n}) | "
        f"weights in a core's cache ({in_cache * mat_bytes / 2**20:.2f} MiB): {cached / 1e9:.1f} GFLOP/s = "
        f"{cached / peak:.0%} of peak | the model's {model_bytes / 2**20:.1f} MiB: "
        f"{stream / 1e9:.1f} GFLOP/s = {stream / peak:.0%} of peak | load "
        f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
