"""Reasoning traces for SFT, from a teacher endpoint or the run's own policy.

From any OpenAI-compatible endpoint (the key comes from $OPENAI_API_KEY, never stored):
  python launch/main.py --config=configs/traces.py --workdir=runs/traces \\
    --config.teacher.base_url=https://api.openai.com/v1 --config.teacher.model=gpt-4o-mini
Rerun the same command after a kill: answers already cached are not sent again.
From the run's own policy by rejection sampling (8 samples, at most 2 right ones kept):
  python launch/main.py --config=configs/traces.py --workdir=runs/traces \\
    --config.traces.source=self --config.traces.self_checkpoint=runs/rl
Writes <workdir>/traces.jsonl (example_id, trace, decision, model, created) and its counts.
"""
import ml_collections

from configs import common


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant:
    raise ValueError(f"configs/traces.py has no variants, got {variant!r}")
  c = ml_collections.ConfigDict()
  c.job = "traces"
  c.workdir = "runs/traces"
  c.seed = 0
  c.model = common.model("small")  # dtype of the self policy
  c.mesh = common.mesh()
  c.data = common.data()
  c.teacher = common.teacher()
  c.traces = common.traces()
  return c
