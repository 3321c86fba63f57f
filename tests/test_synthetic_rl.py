"""GRPO raises a format-only policy from chance to >= 0.85 on the synthetic dose task.

One seed here (seed 0: 0.990, far from the bar, so the test does not hang on float
noise); bench/synthetic_rl.py runs all of synthetic_rl.SEEDS (seed 1, the hardest,
0.871) against the same bar.
The bar is 0.85, not 0.9: with one batch-wide advantage scale (mixed rewards keep
their weights) the last rare mistakes are learnt slowly, and the seeds' last-20
accuracies are 0.87-0.99 (synthetic_rl's docstring has the figures).
"""
import pytest

from deepimagine_jax import synthetic_rl


@pytest.mark.slow
def test_grpo_learns_dose_response_rule(tmp_path):
  rows = synthetic_rl.run(str(tmp_path), seed=0)
  s = synthetic_rl.summary(rows)
  assert s["first"] < 0.7, s  # starts near chance: SFT taught the format, not the answer
  assert s["last"] >= synthetic_rl.BAR, s  # 0.85
  assert s["last"] > s["first"] + 0.2, s
