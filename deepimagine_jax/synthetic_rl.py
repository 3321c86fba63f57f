"""Proof that GRPO learns: the controlled dose-response task of data_pipeline/synthetic.py.

A tiny policy is first taught the answer *format* only (SFT on DECISION lines
whose labels are shuffled, so it answers at chance), then GRPO with the
(class-balanced) correctness reward alone must raise its accuracy from chance
(0.5) to >= 0.85 (0.877 measured; tests/test_synthetic_rl.py says why not 0.9).
Used by tests/test_synthetic_rl.py and bench/synthetic_rl.py (which plots it).
"""
from __future__ import annotations

import os
import random

import numpy as np

from data_pipeline import grain_pipeline, synthetic, templates
from deepimagine_jax import metrics_log, rewards, rl, sft, sharding, train_state
from deepimagine_jax.config import LoopConfig, ModelConfig, OptimizerConfig, RLConfig, SFTConfig
from deepimagine_jax.tokenizer import Tokenizer

PROMPT_LEN = 64


def run(workdir: str, *, rl_steps: int = 160, sft_steps: int = 60, seed: int = 0,
        prompts_per_step: int = 16, group_size: int = 8, lr: float = 1e-3) -> list[dict]:
  """Runs format-only SFT then GRPO; returns the GRPO metrics, one dict per step."""
  examples = synthetic.make_synthetic(2000, seed)
  tok = Tokenizer.train([e.prompt + "\n" + e.completion for e in examples],
                        os.path.join(workdir, "tokenizer"), vocab_size=320)
  rnd = random.Random(seed)
  format_only = [e.replace(completion=templates.decision_line(2, rnd.randrange(2)))
                 for e in examples]
  cfg = ModelConfig.tiny().replace(vocab_size=tok.vocab_size, max_seq_len=128)
  mesh = sharding.make_mesh(-1, 1, 1)
  batches = grain_pipeline.make_sft_iterator(format_only, tok, seq_len=48, global_batch_size=32,
                                             seed=seed)
  no_checkpoints = dict(checkpoint_every=10_000, keep_checkpoints=1, resume=True)
  sft_cfg = SFTConfig(
      loop=LoopConfig(steps=sft_steps, log_every=20, **no_checkpoints), global_batch_size=32,
      kinds=("synthetic",), optimizer=_adamw(3e-3, warmup_steps=5, steps=sft_steps), traces=(),
      trace_order="reasoning_first", imagined=())
  graphdef, params = train_state.init_params(cfg, mesh, seed)
  state = sft.run_sft(sft_cfg, mesh, graphdef, params, batches, os.path.join(workdir, "sft"),
                      seed=seed)
  prompts = grain_pipeline.make_prompt_iterator(examples, tok, prompt_len=PROMPT_LEN,
                                                batch_size=prompts_per_step, seed=seed)
  rl_cfg = RLConfig(
      loop=LoopConfig(steps=rl_steps, log_every=20, **no_checkpoints), splits=("train",),
      kinds=("synthetic",), prompts_per_step=prompts_per_step, group_size=group_size,
      max_new_tokens=10, temperature=1.0, top_k=0, top_p=1.0, eps_low=0.2, eps_high=0.28,
      beta=0.0, aggregation="token", advantage_scale="batch_std", updates_per_rollout=1,
      recompute_old_logprobs=False, reward_weights=(("correctness", 1.0),),
      cache_dtype="float32",
      optimizer=_adamw(lr, warmup_steps=0, steps=rl_steps))
  balance = rewards.ClassBalance.of([e.label for e in examples], [e.n_options for e in examples])
  rl.run_grpo(rl_cfg, mesh, graphdef, state.params, None, prompts, tok,
              os.path.join(workdir, "rl"), seed=seed, ref_handle={}, balance=balance)
  return metrics_log.read_metrics(os.path.join(workdir, "rl", "metrics.jsonl"))


def _adamw(lr: float, *, warmup_steps: int, steps: int) -> OptimizerConfig:
  return OptimizerConfig(learning_rate=lr, warmup_steps=warmup_steps, total_steps=steps,
                         end_lr_ratio=0.1, weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8,
                         grad_clip_norm=1.0, grad_accum_steps=1)


def summary(rows: list[dict], window: int = 20) -> dict:
  """Mean accuracy over the first and last `window` steps (the reward is its class-weighted twin)."""
  r = np.array([row["accuracy"] for row in rows])
  return {"first": float(r[:window].mean()), "last": float(r[-window:].mean()),
          "steps": len(r)}
