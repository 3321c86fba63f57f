"""The world experiment end to end: one seed, a few steps, every arm, reference and file."""
import json

import pytest

from configs import world as world_config
from deepimagine_jax import world as world_job
from deepimagine_jax.world import ARMS, REFERENCES


@pytest.mark.slow
def test_world_quick_end_to_end(tmp_path):
  c = world_config.get_config("quick")
  # tiny compiles in seconds; its 256-token context cuts pair prompts (the default uses mini)
  c.model.preset = "tiny"
  c.data.seq_len = 256
  c.data.prompt_len = 240
  c.rl.max_new_tokens = 8
  c.eval.max_new_tokens = 16  # per-arm estimates are written after a 240-token prompt
  c.rl.prompts_per_step = 8  # a multiple of the 8 test devices
  c.rl.group_size = 2
  results = world_job.world(c, str(tmp_path))
  for split in c.experiment.splits:
    for name in ARMS + REFERENCES:
      entry = results[split][name]
      lo, hi = entry["ci"]["balanced_accuracy"]
      assert 0.0 <= lo <= hi <= 1.0, (split, name)
      assert entry["cross_entropy"] > 0
    for name, walk in (("imagining", "decision"), ("arm_walks", "per_arm")):
      stats = results[split][name]["stats"][0]
      assert stats["imagined"] + stats["fallback"] == results[split]["questions"]["n"]
      assert stats["walk"] == walk
    assert results[split]["arm_walks"]["stats"][0]["estimates"]["n"] >= 0
  sizes = json.loads((tmp_path / "data" / "report.json").read_text())[
      "split_sizes_by_kind"]
  assert sizes["train"]["arm_estimate"] > 0 and sizes["train"]["arm_compare"] > 0
  assert not any(k.startswith("arm_") for s in ("test_combo", "test_dose")
                 for k in sizes.get(s, {}))  # the per-arm operators train only
  for name in ("world.md", "world.json", "world.png"):
    assert (tmp_path / "report" / name).stat().st_size > 0
  assert "arm_walks, test_combo, seed 0:" in (tmp_path / "report" / "world.md").read_text()
  saved = json.loads((tmp_path / "report" / "world.json").read_text())
  assert saved["build"]["split_sizes"]["test_combo"] > 0
  assert [json.loads(l)["step"] for l in open(tmp_path / "seed0" / "grpo" / "rl" / "metrics.jsonl")] == [1]
