"""Proof that GRPO learns: the controlled dose-response task of data_pipeline/synthetic.py.

A tiny policy is first taught the answer *format* only (SFT on DECISION lines
whose labels are shuffled, so it answers at chance), then GRPO with the
correctness reward alone must raise its accuracy from chance (0.5) to >= 0.9.
Used by tests/test_synthetic_rl.py and bench/synthetic_rl.py (which plots it).
"""
from __future__ import annotations

import os
import random

import numpy as np

from data_pipeline import grain_pipeline, synthetic, templates
from deepimagine_jax import metrics_log, rl, sft, sharding
from deepimagine_jax.config import ModelConfig
from deepimagine_jax.optimizer import OptimizerConfig
from deepimagine_jax.tokenizer import Tokenizer

PROMPT_LEN = 64


def run(workdir: str, *, rl_steps: int = 160, sft_steps: int = 60, seed: int = 0,
        prompts_per_step: int = 16, group_size: int = 8, lr: float = 1e-3) -> list[dict]:
  """Runs format-only SFT then GRPO; returns the GRPO metrics, one dict per step."""
  examples = synthetic.make_synthetic(2000, seed)
  tok = Tokenizer.train([e["prompt"] + "\n" + e["completion"] for e in examples],
                        os.path.join(workdir, "tokenizer"), vocab_size=320)
  rnd = random.Random(seed)
  format_only = [dict(e, completion=templates.decision_line(2, rnd.randrange(2)))
                 for e in examples]
  cfg = ModelConfig.tiny().replace(vocab_size=tok.vocab_size, max_seq_len=128)
  mesh = sharding.make_mesh(-1, 1, 1)
  batches = grain_pipeline.make_sft_iterator(format_only, tok, seq_len=48, global_batch_size=32,
                                             seed=seed)
  graphdef, state = sft.run_sft(
      cfg, OptimizerConfig(learning_rate=3e-3, warmup_steps=5, total_steps=sft_steps,
                           weight_decay=0.0),
      sft.TrainConfig(steps=sft_steps, global_batch_size=32, seq_len=48, log_every=20,
                      checkpoint_every=10_000), mesh, batches, os.path.join(workdir, "sft"),
      seed=seed)
  prompts = grain_pipeline.make_prompt_iterator(examples, tok, prompt_len=PROMPT_LEN,
                                                batch_size=prompts_per_step, seed=seed)
  rcfg = rl.RLConfig(steps=rl_steps, prompts_per_step=prompts_per_step, group_size=group_size,
                     max_new_tokens=10, temperature=1.0, beta=0.0,
                     reward_weights=(("correctness", 1.0),), log_every=20,
                     checkpoint_every=10_000)
  rl.run_grpo(rcfg, OptimizerConfig(learning_rate=lr, warmup_steps=0, total_steps=rl_steps,
                                    weight_decay=0.0),
              mesh, graphdef, state.params, None, prompts, tok, os.path.join(workdir, "rl"),
              seed=seed)
  return metrics_log.read_metrics(os.path.join(workdir, "rl", "metrics.jsonl"))


def summary(rows: list[dict], window: int = 20) -> dict:
  """Mean reward over the first and last `window` steps."""
  r = np.array([row["reward_mean"] for row in rows])
  return {"first": float(r[:window].mean()), "last": float(r[-window:].mean()),
          "steps": len(r)}
