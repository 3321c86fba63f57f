"""Seconds per GRPO step, per stage, against this machine's compute limit measured in the same run.

  python bench/rl_step.py                      # the tunix peer's shape: 8 prompts x 4, 256 + 64
  python bench/rl_step.py --peer=tunix --peer_python=/tmp/peer-venv/bin/python
  python bench/rl_step.py --prompts=16 --group=8
  python bench/rl_step.py --host_devices=1          # one JAX device for the whole CPU

Prints one line: per stage (sample, reward, reference, update) the median seconds, its
matmul FLOPs (counted from the ModelConfig: `step_flops`), the time those FLOPs take at
the matmul peak measured in this run (float32 on CPU, bfloat16 on accelerators,
interleaved with the steps so both see the same load) and the fraction of that limit
reached (limit / seconds). Rows never stop early (no EOS), so every step decodes all new
tokens. Compile time is excluded. With `--peer=tunix` google-tunix's own GRPO learner
(bench/peer_tunix.py) then runs on the same shape, prompts and settings and the line
ends with both seconds per step and the ratio.

On a CPU both run on `--host_devices` JAX devices (default: one per core), the batch
sharded over them (ours over the mesh's data axis, tunix's over fsdp as in its
examples): XLA splits each op of a single-device program between the cores, which does
not pay for a decode step's small ops (on 2 cores, ours decoded as fast on one core as on
two). The line names the device count of each; the peer runs on one device and on
--host_devices, and its faster time is the one compared.
"""
import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import peer_tunix  # noqa: E402  (imports no JAX)

if __name__ == "__main__":
  peer_tunix.use_host_devices(sys.argv[1:])  # before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import common  # noqa: E402
from configs import rl as rl_config  # noqa: E402
from deepimagine_jax import rewards, rl, sampler, sharding, train_state  # noqa: E402
from deepimagine_jax.config import ModelConfig, OptimizerConfig, RLConfig  # noqa: E402
from deepimagine_jax.optimizer import make_optimizer  # noqa: E402

STAGES = ("sample", "reward", "reference", "update")


def forward_flops(cfg: ModelConfig, tokens: int, key_pairs: int, head_tokens: int) -> int:
  """Matmul FLOPs (2 per multiply-add) of a forward over `tokens` rows.

  `key_pairs`: (query, key) pairs scored, summed over all tokens; `head_tokens`:
  positions that run the output head. Norms, RoPE, softmax are left out (< 1%).
  """
  D, N, K, H, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
  dense = 2 * (2 * D * N * H + 2 * D * K * H + 3 * D * F)  # q, o; k, v; gate, up, down
  attention = 4 * N * H  # scores and the weighted sum, per (query, key) pair
  return (cfg.n_layers * (tokens * dense + key_pairs * attention)
          + head_tokens * 2 * D * cfg.vocab_size)


def step_flops(cfg: ModelConfig, prompts: int, group: int, prompt_len: int, new: int,
               beta: float) -> dict[str, int]:
  """The GRPO step's necessary matmul FLOPs per stage.

  Attention counts causal pairs only (a query at slot s sees s + 1 keys): work a
  dense masked implementation does beyond that shows as a lower fraction. Sampling:
  each prompt prefilled once (head at its last slot), then new - 1 decode tokens per
  row. Reference: the same prefix forward with the head at all `new` positions.
  Update: that forward plus its backward (2x: gradients of activations and weights).
  """
  B, P, C = prompts * group, prompt_len, new
  tri = lambda n: n * (n + 1) // 2
  prefill = forward_flops(cfg, prompts * P, prompts * tri(P), prompts)
  decode_pairs = B * (tri(P + C - 1) - tri(P))  # slots P .. P+C-2 query the cache
  decode = forward_flops(cfg, B * (C - 1), decode_pairs, B * (C - 1))
  score = prefill - prompts * 2 * cfg.d_model * cfg.vocab_size + forward_flops(
      cfg, B * (C - 1), decode_pairs, B * C)
  return {"sample": prefill + decode, "reward": 0,
          "reference": score if beta > 0 else 0, "update": 3 * score}


def make_peak(n: int, dtype):
  """Seconds of one n x n matmul in `dtype` (2 n^3 FLOPs) at the best this machine does.

  Timed two ways, the faster kept: compiled for one device (XLA splits it between the
  cores of a CPU), and with its rows split over every device (one per core on a CPU with
  host devices, bench/peer_tunix.use_host_devices). Warmed up."""
  a_NN, b_NN = (jax.random.normal(k, (n, n), dtype) for k in jax.random.split(jax.random.key(0)))
  dot = jax.jit(jnp.dot)
  calls = [lambda: dot(a_NN, b_NN)]
  if jax.device_count() > 1 and n % jax.device_count() == 0:
    mesh = jax.make_mesh((jax.device_count(),), ("rows",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows"))
    a_rows = jax.device_put(a_NN, rows)
    b_all = jax.device_put(b_NN, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    calls.append(lambda: dot(a_rows, b_all))
  for call in calls:
    jax.block_until_ready(call())

  def seconds() -> float:
    best = float("inf")
    for call in calls:
      start = time.perf_counter()
      jax.block_until_ready(call())
      best = min(best, time.perf_counter() - start)
    return best

  return seconds


def run_peer(args) -> str:
  """google-tunix's step on the same shape in a subprocess, on one device and on
  --host_devices devices; the line's peer part names both and leads with the faster."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_tunix.py")
  flags = [f"--{k}={getattr(args, k)}" for k in ("prompts", "group", "prompt_len", "new",
                                                    "steps", "beta", "lr")]
  results = []
  for devices in sorted({1, args.host_devices}):
    proc = subprocess.run([args.peer_python, script, *flags, f"--host_devices={devices}"],
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
      raise SystemExit(f"peer {args.peer_python} {script} failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")
    result = json.loads(lines[-1])
    if "error" in result:
      return result["error"]
    results.append(result)
  best = min(results, key=lambda r: r["s_per_step"])
  others = "; ".join(f"{r['s_per_step']:.2f} s on {r['devices']}" for r in results
                     if r is not best)
  return (f"tunix {best['s_per_step']:.2f} s/step (median of {best['steps']}, "
          f"{best['devices']} devices{'; ' + others if others else ''})")


def time_stages(cfg: ModelConfig, args, matmul) -> tuple[dict[str, list[float]], list[float]]:
  """Seconds per stage of `args.steps` GRPO steps after one compiling step, and the
  matmul's seconds (`make_peak`) run twice after each step so both see the same load.

  `args` carries the `peer_tunix.shape_args` fields. Raises on a non-finite loss.
  """
  mesh = sharding.make_mesh(-1, 1, 1)
  P, N, B = args.prompt_len, args.new, args.prompts * args.group
  rcfg = dataclasses.replace(RLConfig.from_config(rl_config.rl_section(args.steps)),
                             prompts_per_step=args.prompts, group_size=args.group,
                             max_new_tokens=N, beta=args.beta)
  opt = dataclasses.replace(OptimizerConfig.for_run(common.optimizer(lr=args.lr), 100),
                            warmup_steps=0)
  tx, _ = make_optimizer(opt)
  graphdef, params = train_state.init_params(cfg, mesh, seed=0)
  state, state_sh = train_state.state_from_params(params, tx, mesh, seed=0)
  ref_params = jax.tree.map(lambda x: x.copy(), state.params)
  labels = [i % 2 for i in range(B)]  # both classes, so the class balance is defined
  balance = rewards.ClassBalance.of(labels, [2] * B)
  trainer = rl.GRPOTrainer(graphdef, tx, rcfg, mesh, state_sh, None, balance)
  prompts = jax.device_put(peer_tunix.bench_prompts(args.prompts, P, cfg.vocab_size))
  pmask = jax.device_put(np.ones((args.prompts, P), np.int32))
  times = {k: [] for k in STAGES}
  peak_s = []
  with jax.set_mesh(mesh):
    for step in range(args.steps + 1):  # step 0 compiles
      t0 = time.perf_counter()
      out = sampler.sample(graphdef, state.params, prompts, pmask, jax.random.key(step),
                           max_new_tokens=N, temperature=1.0, eos_id=None,
                           group_size=args.group)
      toks = jax.device_get(out.tokens)  # the rollout's one host round trip
      t1 = time.perf_counter()
      texts = [" ".join(map(str, row)) for row in toks.tolist()]  # decode stand-in
      answers = rewards.grade(texts, labels, [2] * B, balance)
      total, _ = rewards.combined_reward(answers, dict(rcfg.reward_weights))
      adv, _ = rl.grpo.group_advantages(jnp.asarray(total), args.group,
                                        scale=rcfg.advantage_scale)
      t2 = time.perf_counter()
      ref = (trainer.logprobs(ref_params, prompts, pmask, out.tokens)
             if args.beta > 0 else jnp.zeros_like(out.logprobs))
      jax.block_until_ready(ref)
      t3 = time.perf_counter()
      batch = jax.device_put({"prompt_tokens": prompts, "prompt_mask": pmask,
                              "completions": out.tokens,
                              "old_logprobs": out.logprobs, "advantages": adv,
                              "completion_mask": out.completion_mask, "ref_logprobs": ref},
                             trainer.batch_sh)
      state, aux = trainer.update(state, batch)
      jax.block_until_ready(aux)
      t4 = time.perf_counter()
      if step:
        for k, v in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
          times[k].append(v)
        peak_s += [matmul(), matmul()]  # interleaved: the same share of the cores
  if not np.isfinite(float(aux["loss"])):
    raise SystemExit(f"non-finite loss {float(aux['loss'])}")
  return times, peak_s


def main():
  ap = peer_tunix.shape_args(argparse.ArgumentParser())
  ap.add_argument("--peer", choices=("none", "tunix"), default="none")
  ap.add_argument("--peer_python", default=sys.executable,
                  help="an interpreter that imports tunix (e.g. a separate venv)")
  ap.add_argument("--matmul_n", type=int, default=1024)
  args = ap.parse_args()

  cfg = ModelConfig.small()
  on_cpu = jax.devices()[0].platform == "cpu"
  peak_dtype = jnp.float32 if on_cpu else jnp.bfloat16
  matmul = make_peak(args.matmul_n, peak_dtype)
  times, peak_s = time_stages(cfg, args, matmul)
  P, N = args.prompt_len, args.new

  peak = 2.0 * args.matmul_n**3 / statistics.median(peak_s)
  flops = step_flops(cfg, args.prompts, args.group, P, N, args.beta)
  med = {k: statistics.median(v) for k, v in times.items()}
  total_s, total_f = sum(med.values()), sum(flops.values())
  parts = []
  for k in STAGES:
    frac = f" {flops[k] / peak / med[k]:.0%}" if flops[k] else ""
    parts.append(f"{k} {med[k]:.3f} s {flops[k] / 1e9:.1f} GF{frac}")
  line = (f"rl_step small {args.prompts}x{args.group} prompt={P} new={N} beta={args.beta} "
          f"on {jax.device_count()} {jax.devices()[0].platform} devices | "
          f"{total_s:.2f} s/step, {total_f / 1e9:.1f} GFLOP, limit {total_f / peak:.2f} s at "
          f"{jnp.dtype(peak_dtype).name} matmul peak {peak / 1e9:.1f} GFLOP/s (n={args.matmul_n})"
          f" = {total_f / peak / total_s:.0%} of limit | " + ", ".join(parts) +
          f" | load {os.getloadavg()[0]:.1f}")
  if args.peer == "tunix":
    peer = run_peer(args)
    if peer.startswith("tunix "):
      peer_s = float(peer.split()[1])
      peer = f"{peer}, ours {total_s:.2f}: {peer_s / total_s:.2f}x faster"
    line += f" | {peer} | load {os.getloadavg()[0]:.1f}"
  print(line)


if __name__ == "__main__":
  main()
