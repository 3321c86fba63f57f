"""Accelerator-ready figures in one run: bf16 parity, SFT MFU, sampler tokens/s, GRPO split.

  python bench/accelerator.py                  # GPU / TPU: qwen3_0_6b shapes, under 8 min
  python bench/accelerator.py                  # CPU only: a reduced `small` run, said so
  python bench/accelerator.py --preset=mini --steps=1   # any size may be overridden

Prints five lines, every figure from this one run:
  accelerator  the device, and whether this is the full run or the reduced CPU one;
  parity       bf16 compute against float32 (the same float32 parameters; the float32
               pass at matmul precision "highest", so neither TF32 nor bf16 passes slip
               in) over random tokens: max and mean |logit diff|, argmax agreement and the
               stated tolerance;
  sampler      bench/sampler.time_cache's end-to-end and decode tokens/s per batch size;
  sft          train_step.time_sft's tokens/s, and model FLOP/s (ModelConfig.flops_per_token)
               as MFU against the device kind's published dense bf16 peak (PEAKS) and
               against a large matmul in the step's dtype timed after each step;
  grpo         rl_step.time_stages's seconds per stage and, at the matmul peak timed after
               each of its steps, the fraction of each stage's limit (rl_step.step_flops /
               peak / seconds).
Compile time is excluded except where printed as such; each line ends with the wall time
since the start (compiles included). On CPU bf16 matmuls are emulated, so the reduced
run's sampler, SFT and GRPO compute in float32 against a float32 peak; its parity line is
bf16 as on an accelerator.

The accelerator sizes aim at a 16 GB device (not yet run on one). bench/memory.py's plan
(a CPU compile: an estimate) for qwen3_0_6b, bf16 compute, remat: the SFT step 12.0 GiB
(float32 parameters 2.2 + Adam 4.4 + temporaries 5.4); the GRPO update at 2 x 4 prompts,
128 + 64 tokens, 14.3 GiB with float32 parameters, plus the float32 reference copy
(2.2 GiB; the plan's `parameters, GRPO reference copy` row): over 16, so GRPO keeps its
parameters, Adam state and reference in bfloat16: 12.1 GiB + 1.1 for the reference.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bench.rl_step import STAGES, make_peak, step_flops, time_stages  # noqa: E402
from bench.sampler import time_cache  # noqa: E402
from bench.train_step import time_sft  # noqa: E402
from deepimagine_jax import model as model_lib  # noqa: E402
from deepimagine_jax.config import ModelConfig  # noqa: E402

# Dense (no sparsity) bf16 peak TFLOP/s by device kind, from the vendors' datasheets:
# NVIDIA H100 / H200 SXM 989 (H100 PCIe 756), A100 312, L4 121 (half their "with
# sparsity" figures); Google Cloud TPU system-architecture pages: v4 275, v5e 197,
# v5p 459, v6e (Trillium) 918. JAX names v5e "TPU v5 lite" and v6e "TPU v6 lite".
PEAKS = (
    (r"H100 PCIe", 756.0), (r"H100|H200", 989.0), (r"A100", 312.0), (r"\bL4\b", 121.0),
    (r"TPU v4", 275.0), (r"TPU v5 ?lite|TPU v5e", 197.0), (r"TPU v5p|TPU v5$", 459.0),
    (r"TPU v6 ?lite|TPU v6e", 918.0),
)

# Sizes per mode. The accelerator's fit 16 GB per chip; the CPU's run in minutes on 2 cores.
SIZES = {
    "accelerator": dict(preset="qwen3_0_6b", parity_batch=2, parity_len=512, batch=4,
                        seq_len=512, accum=1, steps=5, batches="1,32,128", prompt=128,
                        new=128, prompts=2, group=4, grpo_prompt=128, grpo_new=64,
                        grpo_steps=3, grpo_param_dtype="bfloat16", matmul_n=8192),
    "cpu": dict(preset="small", parity_batch=2, parity_len=128, batch=8, seq_len=256,
                accum=1, steps=2, batches="1,4,8", prompt=64, new=32, prompts=2, group=4,
                grpo_prompt=64, grpo_new=32, grpo_steps=2, grpo_param_dtype="float32",
                matmul_n=1024),
}
# Sharded over the batch axis of a mesh of all devices: the accelerator defaults are per
# device (SFT sequences, GRPO prompts), so a host with several chips runs the same per chip.
PER_DEVICE = ("batch", "prompts")
# bf16 keeps 8 significant bits (relative rounding 2^-9 per operation), which compounds
# over the layers: logits may differ by a few percent of their range. An argmax flips
# where the top two f32 logits are that close, and a random model's are often close (the
# gap between the top two of V Gaussians shrinks like 1 / sqrt(2 ln V)): on CPU the
# qwen3_0_6b shape gave max |diff| 0.116 (2.1% of max |logit| 5.53), agreement 0.961 of
# 128 positions. A wrong cast or an overflow gives far more than either bound.
TOLERANCE = dict(max_rel=0.05, agree=0.90)
BETA = 0.04  # the GRPO step's KL weight, as rl_step's default


def table_peak(device_kind: str) -> float | None:
  """Published dense bf16 peak FLOP/s of this device kind; None when not in PEAKS."""
  for pattern, tflops in PEAKS:
    if re.search(pattern, device_kind):
      return tflops * 1e12
  return None


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logits(graphdef, params, tokens_BT):
  B, T = tokens_BT.shape
  positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  return nnx.merge(graphdef, params)(tokens_BT, positions_BT)[0]


@jax.jit
def parity_stats(ref_BTV, got_BTV) -> dict[str, jax.Array]:
  """max / mean |diff|, max |ref| and the fraction of positions whose argmax agrees."""
  diff = jnp.abs(got_BTV.astype(jnp.float32) - ref_BTV.astype(jnp.float32))
  return {"max_diff": diff.max(), "mean_diff": diff.mean(),
          "max_ref": jnp.abs(ref_BTV).max(),
          "agree": jnp.mean(jnp.argmax(got_BTV, -1) == jnp.argmax(ref_BTV, -1))}


def graphdef_of(cfg: ModelConfig):
  """The model's graph definition for `cfg`, without allocating parameters."""
  return nnx.split(nnx.eval_shape(lambda: model_lib.Transformer(cfg, nnx.Rngs(0))))[0]


def parity_line(cfg32: ModelConfig, params, batch: int, length: int) -> str:
  """bf16 compute against float32 on the same float32 parameters."""
  tokens_BT = jax.random.randint(jax.random.key(1), (batch, length), 0, cfg32.vocab_size)
  with jax.default_matmul_precision("highest"):
    ref_BTV = _logits(graphdef_of(cfg32), params, tokens_BT)
  got_BTV = _logits(graphdef_of(cfg32.replace(dtype="bfloat16")), params, tokens_BT)
  s = {k: float(v) for k, v in parity_stats(ref_BTV, got_BTV).items()}
  ok = s["max_diff"] <= TOLERANCE["max_rel"] * s["max_ref"] and s["agree"] >= TOLERANCE["agree"]
  return (f"parity bf16 vs f32 B={batch} T={length} (f32 params; f32 at precision highest) | "
          f"max |diff| {s['max_diff']:.4f}, mean |diff| {s['mean_diff']:.5f}, max |f32 logit| "
          f"{s['max_ref']:.3f}, argmax agreement {s['agree']:.4f} of {batch * length} | "
          f"tolerance max |diff| <= {TOLERANCE['max_rel']} x max |f32 logit| and agreement "
          f">= {TOLERANCE['agree']}: {'pass' if ok else 'FAIL'}")


def main(argv=None):
  on_cpu = jax.devices()[0].platform == "cpu"
  mode = "cpu" if on_cpu else "accelerator"
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for key, value in SIZES[mode].items():
    scale = jax.device_count() if mode == "accelerator" and key in PER_DEVICE else 1
    ap.add_argument(f"--{key}", type=type(value), default=value * scale)
  args = ap.parse_args(argv)
  start = time.perf_counter()
  wall = lambda: f" | wall {time.perf_counter() - start:.0f} s since start"
  dev = jax.devices()[0]
  kind, table = dev.device_kind, table_peak(dev.device_kind)
  # Peaks are per chip; the steps run on all of them (fake CPU devices share one machine).
  chips = 1 if on_cpu else jax.device_count()
  compute = "float32" if on_cpu else "bfloat16"
  cfg32 = getattr(ModelConfig, args.preset)().replace(
      dtype="float32", param_dtype="float32", scan_layers=True)
  cfg = cfg32.replace(dtype=compute, remat=not on_cpu)
  print(f"accelerator {jax.device_count()}x{dev.platform} ({kind}) jax {jax.__version__} | "
        + ("CPU only, no accelerator: REDUCED run" if on_cpu else "full run") +
        f", preset {args.preset} ({cfg.num_params() / 1e6:.1f}M, scan_layers), "
        f"compute {compute}, remat {cfg.remat}", flush=True)

  params = nnx.split(model_lib.Transformer(cfg32, nnx.Rngs(0)))[1]
  print(parity_line(cfg32, params, args.parity_batch, args.parity_len) + wall(), flush=True)
  cache = "float32" if on_cpu else "bfloat16"
  timed = {int(b): time_cache(graphdef_of(cfg), params, cfg.vocab_size, int(b), args.prompt,
                              args.new, cache, 2)[:2] for b in args.batches.split(",")}
  del params  # the train states below hold their own
  print(f"sampler {args.preset} prompt={args.prompt} new={args.new} compute={compute} "
        f"cache={cache} (median of 2) | " + " | ".join(
            f"B={b}: {b * args.new / e2e:.0f} tok/s (decode {b * (args.new - 1) / dec:.0f})"
            for b, (e2e, dec) in timed.items()) + wall(), flush=True)

  peak_dtype = jnp.dtype(compute)
  matmul = make_peak(args.matmul_n, peak_dtype)
  matmul_flops = 2.0 * args.matmul_n**3
  loss, compile_s, times, mm_times, _ = time_sft(cfg, args.batch, args.seq_len, args.steps,
                                                  args.accum, matmul, 2)
  step_s = statistics.median(times)
  tokens_s = args.batch * args.seq_len / step_s
  flops_s = cfg.flops_per_token(args.seq_len) * tokens_s
  peak = chips * matmul_flops / statistics.median(mm_times)
  table_part = (f"{flops_s / (chips * table):.1%} of {chips} x {kind}'s table bf16 peak "
                f"{table / 1e12:.0f} TFLOP/s"
                if table else f"no table peak for {kind!r}")
  print(f"sft {args.preset} T={args.seq_len} B={args.batch} accum={args.accum} "
        f"dtype={compute} remat={cfg.remat} | {tokens_s:.0f} tokens/s, step "
        f"{step_s * 1e3:.1f} ms (median of {args.steps}) | model {flops_s / 1e12:.4f} TFLOP/s"
        f" = MFU {table_part}; {flops_s / peak:.1%} of the {peak_dtype.name} matmul peak "
        f"measured after each step, {chips} x {peak / chips / 1e12:.4f} TFLOP/s (n="
        f"{args.matmul_n})" + (f" = {peak / chips / table:.0%} of the table's" if table else "")
        + f" | compile+1st step {compile_s:.1f} s, loss {loss:.3f}" + wall(), flush=True)

  grpo_args = argparse.Namespace(prompts=args.prompts, group=args.group,
                                 prompt_len=args.grpo_prompt, new=args.grpo_new,
                                 steps=args.grpo_steps, beta=BETA, lr=1e-5)
  grpo_cfg = cfg.replace(param_dtype=args.grpo_param_dtype)
  stage_s, grpo_mm = time_stages(grpo_cfg, grpo_args, matmul)
  peak = chips * matmul_flops / statistics.median(grpo_mm)
  flops = step_flops(cfg, args.prompts, args.group, args.grpo_prompt, args.grpo_new, BETA)
  med = {k: statistics.median(v) for k, v in stage_s.items()}
  total_s, total_f = sum(med.values()), sum(flops.values())
  print(f"grpo {args.preset} {args.prompts}x{args.group} prompt={args.grpo_prompt} "
        f"new={args.grpo_new} beta={BETA} params={args.grpo_param_dtype} "
        f"(median of {args.grpo_steps}) | {total_s:.3f} s/step"
        f" = {total_f / peak / total_s:.0%} of the {total_f / peak:.3f} s limit at the "
        f"{peak_dtype.name} matmul peak measured after each step, {chips} x "
        f"{peak / chips / 1e12:.4f} TFLOP/s | "
        + ", ".join(f"{k} {med[k]:.3f} s ({med[k] / total_s:.0%} of the step"
                    + (f", {flops[k] / peak / med[k]:.0%} of its limit)" if flops[k] else ")")
                    for k in STAGES) + wall(), flush=True)


if __name__ == "__main__":
  main()
