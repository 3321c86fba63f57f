"""Seconds per GRPO step on the `small` model, split into sampling / reward / reference / update.

  python bench/rl_step.py                      # the tunix peer's shape: 8 prompts x 4, 256 + 64
  python bench/rl_step.py --prompts=16 --group=8

Prints one line. The shape matches the peer measurement in the brief (google-tunix 0.1.7 on
this 2-core CPU: 7.4 s/step = sampling 1.7 + reference 0.9 + update 4.7). Rows never stop
early (no EOS), so every step decodes all new tokens. Compile time is excluded.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import dataclasses  # noqa: E402

from configs import common  # noqa: E402
from configs import rl as rl_config  # noqa: E402
from deepimagine_jax import rewards, rl, sampler, sharding, train_state  # noqa: E402
from deepimagine_jax.config import ModelConfig, OptimizerConfig, RLConfig  # noqa: E402
from deepimagine_jax.optimizer import make_optimizer  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--group", type=int, default=4)
  ap.add_argument("--prompt_len", type=int, default=256)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--beta", type=float, default=0.04)
  args = ap.parse_args()

  cfg = ModelConfig.small()
  mesh = sharding.make_mesh(-1, 1, 1)
  P, N, B = args.prompt_len, args.new, args.prompts * args.group
  rcfg = dataclasses.replace(RLConfig.from_config(rl_config.rl_section(args.steps)),
                             prompts_per_step=args.prompts, group_size=args.group,
                             max_new_tokens=N, beta=args.beta)
  opt = dataclasses.replace(OptimizerConfig.for_run(common.optimizer(lr=1e-5), 100),
                            warmup_steps=0)
  tx, _ = make_optimizer(opt)
  graphdef, params = train_state.init_params(cfg, mesh, seed=0)
  state, state_sh = train_state.state_from_params(params, tx, mesh, seed=0)
  ref_params = jax.tree.map(lambda x: x.copy(), state.params)
  labels = [i % 2 for i in range(B)]  # both classes, so the class balance is defined
  balance = rewards.ClassBalance.of(labels, [2] * B)
  trainer = rl.GRPOTrainer(graphdef, tx, rcfg, mesh, state_sh, None, balance)
  rng = np.random.default_rng(0)
  prompts = jax.device_put(rng.integers(4, cfg.vocab_size, (args.prompts, P)).astype(np.int32))
  pmask = jax.device_put(np.ones((args.prompts, P), np.int32))

  times = {"sample": [], "reward": [], "reference": [], "update": [], "total": []}
  with jax.set_mesh(mesh):
    for step in range(args.steps + 1):  # step 0 compiles
      t0 = time.perf_counter()
      out = sampler.sample(graphdef, state.params, prompts, pmask, jax.random.key(step),
                           max_new_tokens=N, temperature=1.0, eos_id=None,
                           group_size=args.group)
      jax.block_until_ready(out)
      t1 = time.perf_counter()
      toks = jax.device_get(out.tokens)
      texts = [" ".join(map(str, row)) for row in toks.tolist()]  # decode stand-in
      answers = rewards.grade(texts, labels, [2] * B, balance)
      total, _ = rewards.combined_reward(answers, dict(rcfg.reward_weights))
      adv, _ = rl.grpo.group_advantages(jax.numpy.asarray(total), args.group,
                                        scale=rcfg.advantage_scale)
      t2 = time.perf_counter()
      ref = (trainer.logprobs(ref_params, prompts, pmask, out.tokens)
             if args.beta > 0 else jax.numpy.zeros_like(out.logprobs))
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
        for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
          times[k].append(v)
  med = {k: statistics.median(v) for k, v in times.items()}
  load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split(
      "load average:")[-1].strip()
  peer = 7.4
  print(f"rl_step small {args.prompts}x{args.group} prompt={P} new={N} beta={args.beta} | "
        f"{med['total']:.2f} s/step = sample {med['sample']:.2f} + reward {med['reward']:.3f} + "
        f"reference {med['reference']:.2f} + update {med['update']:.2f} | "
        f"{B * N / med['total']:.0f} completion tok/s | vs tunix 7.4 s: {peer / med['total']:.2f}x "
        f"| load {load}")


if __name__ == "__main__":
  main()
