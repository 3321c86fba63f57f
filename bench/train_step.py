"""SFT train-step throughput and MFU against this machine's own matmul peak.

  python bench/train_step.py                       # from the repo root: small, T=512, B=16
  python bench/train_step.py --dtype=bfloat16 --remat --steps=5

Prints one line. The step is `sft.make_jitted_step` (sharded, state donated)
over a mesh of all local devices, fed random token batches whose loss mask
covers the completion part of each row (a prompt/completion split drawn around
the middle, so about half the tokens). It is compiled and run once before
timing; each timed step ends with block_until_ready on the loss. Model FLOPs
are ModelConfig.flops_per_token(seq_len) x tokens/s (PaLM convention, every
position counted). The peak is measured in the same run: a jitted float32
n x n @ n x n `jnp.dot`, 2 n^3 / median seconds, timed right after each step
so that both see the same load; it stays float32 under --dtype=bfloat16. Load
averages are printed before and after since the cores may be shared.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import dataclasses  # noqa: E402

from configs import common  # noqa: E402
from deepimagine_jax import lora  # noqa: E402
from deepimagine_jax import sft  # noqa: E402
from deepimagine_jax import sharding  # noqa: E402
from deepimagine_jax import train_state  # noqa: E402
from deepimagine_jax.config import ModelConfig, OptimizerConfig  # noqa: E402
from deepimagine_jax.optimizer import make_optimizer  # noqa: E402
from bench.rl_step import make_peak  # noqa: E402  (one timed matmul for every bench)


def random_batch(batch: int, seq_len: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
  """One unpacked SFT batch (design.md "Token batches"): prompt then completion per row."""
  rng = np.random.default_rng(seed)
  tokens_BL = rng.integers(1, vocab, size=(batch, seq_len + 1), dtype=np.int32)
  split_B = rng.integers(seq_len // 4, 3 * seq_len // 4 + 1, size=batch)
  pos_BT = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len))
  return {
      "inputs": tokens_BL[:, :-1],
      "targets": tokens_BL[:, 1:],
      "loss_mask": (pos_BT >= split_B[:, None]).astype(np.float32),
      "positions": np.ascontiguousarray(pos_BT),
      "segment_ids": np.ones((batch, seq_len), np.int32),
  }


def time_sft(cfg: ModelConfig, batch_size: int, seq_len: int, steps: int, accum: int,
             matmul, matmul_repeats: int):
  """(loss, compile + first step s, step seconds, matmul seconds, loss-mask fraction) of
  `steps` timed SFT steps; the matmul (`make_peak`) runs after each step, same load."""
  mesh = sharding.make_mesh()
  sft.check_batch(batch_size, accum, mesh)
  # A constant positive lr so the update is real work, as in a training run.
  opt = dataclasses.replace(OptimizerConfig.for_run(common.optimizer(lr=1e-4), 1000),
                            warmup_steps=0, grad_accum_steps=accum)
  tx, _ = make_optimizer(opt)
  graphdef, params = train_state.init_params(cfg, mesh, seed=0)
  params, frozen = lora.partition(params)  # no adapters: all params train, nothing frozen
  state, state_sh = train_state.state_from_params(params, tx, mesh, seed=0)
  batch_sh = {k: sharding.batch_sharding(mesh) for k in sft.BATCH_KEYS}
  step_fn = sft.make_jitted_step(graphdef, tx, accum, state_sh, batch_sh,
                                 jax.tree.map(lambda x: x.sharding, frozen))
  host = random_batch(batch_size, seq_len, cfg.vocab_size, seed=0)
  batch = {k: jax.device_put(host[k], batch_sh[k]) for k in sft.BATCH_KEYS}

  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batch, frozen)
    jax.block_until_ready(metrics["loss"])
    compile_s = time.perf_counter() - t0
    times, mm_times = [], []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = step_fn(state, batch, frozen)
      jax.block_until_ready(metrics["loss"])
      times.append(time.perf_counter() - t0)
      # Interleaved, so the peak sees the same share of the cores as the steps.
      mm_times += [matmul() for _ in range(matmul_repeats)]
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    raise SystemExit(f"non-finite loss {loss}")
  return loss, compile_s, times, mm_times, float(host["loss_mask"].mean())


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="small", help="a ModelConfig classmethod")
  ap.add_argument("--seq_len", type=int, default=512)
  ap.add_argument("--batch", type=int, default=16, help="global batch (sequences per step)")
  ap.add_argument("--steps", type=int, default=8, help="timed steps")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="compute dtype; parameters stay float32")
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--accum", type=int, default=1, help="grad_accum_steps")
  ap.add_argument("--matmul_n", type=int, default=2048)
  ap.add_argument("--matmul_repeats", type=int, default=2, help="peak runs after each step")
  args = ap.parse_args()

  load0 = os.getloadavg()
  cfg = getattr(ModelConfig, args.preset)().replace(dtype=args.dtype, remat=args.remat)
  if args.seq_len > cfg.max_seq_len:
    raise SystemExit(f"--seq_len {args.seq_len} exceeds {args.preset}.max_seq_len "
                     f"{cfg.max_seq_len}")
  matmul = make_peak(args.matmul_n, jnp.float32)
  loss, compile_s, times, mm_times, mask_frac = time_sft(
      cfg, args.batch, args.seq_len, args.steps, args.accum, matmul, args.matmul_repeats)

  peak = 2.0 * args.matmul_n**3 / statistics.median(mm_times)
  load1 = os.getloadavg()
  step_s = statistics.median(times)
  tokens_s = args.batch * args.seq_len / step_s
  flops_s = cfg.flops_per_token(args.seq_len) * tokens_s
  dev = jax.devices()[0]
  print(f"train_step {args.preset} ({cfg.num_params() / 1e6:.1f}M) "
        f"devices={jax.device_count()}x{dev.platform} T={args.seq_len} B={args.batch} "
        f"accum={args.accum} dtype={args.dtype} remat={args.remat} | "
        f"{tokens_s:.0f} tokens/s, {args.batch / step_s:.2f} examples/s, "
        f"step {step_s * 1e3:.0f} ms (median of {args.steps}, min {min(times) * 1e3:.0f}) | "
        f"model {flops_s / 1e9:.2f} GFLOP/s / f32 matmul peak {peak / 1e9:.1f} GFLOP/s "
        f"(n={args.matmul_n}) = MFU {100 * flops_s / peak:.1f}% | "
        f"compile+1st step {compile_s:.1f}s, loss {loss:.3f}, loss-mask {mask_frac:.2f} | "
        f"load {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} -> "
        f"{load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")


if __name__ == "__main__":
  main()
