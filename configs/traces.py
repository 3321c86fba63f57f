"""Reasoning traces for SFT, from a teacher endpoint or the run's own policy.

From any OpenAI-compatible endpoint (the key comes from $OPENAI_API_KEY, never stored):
  python launch/main.py --config=configs/traces.py --workdir=runs/traces \\
    --config.teacher.base_url=https://api.openai.com/v1 --config.teacher.model=gpt-4o-mini
Rerun the same command after a kill: answers already cached are not sent again.
From the run's own policy by rejection sampling (8 samples, at most 2 right ones kept):
  python launch/main.py --config=configs/traces.py --workdir=runs/traces \\
    --config.traces.source=self --config.traces.self_checkpoint=runs/rl
Writes <workdir>/traces.jsonl (example_id, trace, decision, model, created) and its counts.

Imagined intermediate results of the training chains, walked up to their last trial-level
intermediate step (variant imagine):
  python launch/main.py --config=configs/traces.py:imagine --workdir=runs/imagine \\
    --config.teacher.base_url=https://api.openai.com/v1 --config.teacher.model=gpt-4o-mini
writes <workdir>/imagined.jsonl (imagined_step examples), imagined_traces.jsonl and
imagined_report.json (asked / valid / rejected by reason, per factor). SFT on them:
  python launch/main.py --config=configs/rl.py \\
    --config.sft.imagined="('runs/imagine/imagined.jsonl',)" \\
    --config.sft.traces="('runs/traces/traces.jsonl', 'runs/imagine/imagined_traces.jsonl')"
"""
import ml_collections

from configs import common


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant not in ("", "imagine"):
    raise ValueError(f"configs/traces.py: variants '' and 'imagine', got {variant!r}")
  c = ml_collections.ConfigDict()
  c.job = "traces"
  c.workdir = "runs/traces"
  c.seed = 0
  c.model = common.model("small")  # dtype of the self policy
  c.mesh = common.mesh()
  c.data = common.data()
  c.teacher = common.teacher()
  c.traces = common.traces()
  if variant == "imagine":
    c.workdir = "runs/imagine"
    c.imagine = imagine()
  return c


def imagine() -> ml_collections.ConfigDict:
  """Which steps of the build's chains the teacher imagines (deepimagine_jax/imagined.py)."""
  c = ml_collections.ConfigDict()
  # the trial-level factors: no trial varies them inside itself, so no natural pair does
  c.factors = ("population", "condition", "phase", "allocation", "masking", "country",
               "sample_size")
  c.splits = ("train",)  # training splits only (train, rl)
  c.max_walks = 0  # chains walked, in file order (0 = all)
  return c
