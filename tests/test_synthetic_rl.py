"""GRPO raises a format-only policy from chance to >= 0.9 on the synthetic dose task."""
import pytest

from deepimagine_jax import synthetic_rl


@pytest.mark.slow
def test_grpo_learns_dose_response_rule(tmp_path):
  rows = synthetic_rl.run(str(tmp_path))
  s = synthetic_rl.summary(rows)
  assert s["first"] < 0.7, s  # starts near chance: SFT taught the format, not the answer
  assert s["last"] >= 0.9, s
