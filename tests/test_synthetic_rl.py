"""GRPO raises a format-only policy from chance to >= 0.85 on the synthetic dose task.

One seed here (seed 0: 0.990, far from the bar, so the test does not hang on float
noise); bench/synthetic_rl.py runs all of synthetic_rl.SEEDS (seed 1, the hardest,
0.871) against the same bar.
The bar is 0.85, not 0.9: with one batch-wide advantage scale (mixed rewards keep
their weights) the last rare mistakes are learnt slowly, and the seeds' last-20
accuracies are 0.87-0.99 (synthetic_rl's docstring has the figures).
"""
import json
import subprocess
import sys

import pytest

from deepimagine_jax import synthetic_rl
from test_entry import REPO, launch_env

_RUN = ("import json, sys\n"
        "from deepimagine_jax import synthetic_rl\n"
        "print(json.dumps(synthetic_rl.run(sys.argv[1], seed=0)))\n")


@pytest.mark.slow
def test_grpo_learns_dose_response_rule(tmp_path):
  # 260 training steps of a tiny model run longer than they compile: a child process on the
  # same 8 CPU devices, compiled at XLA's default optimisation (not the suite's level 0).
  proc = subprocess.run([sys.executable, "-c", _RUN, str(tmp_path)], cwd=REPO,
                        env=launch_env(8, optimized=True), capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = json.loads(proc.stdout.strip().splitlines()[-1])
  s = synthetic_rl.summary(rows)
  assert s["steps"] == synthetic_rl.RL_STEPS, s
  assert s["first"] < 0.7, s  # starts near chance: SFT taught the format, not the answer
  assert s["last"] >= synthetic_rl.BAR, s  # 0.85
  assert s["last"] > s["first"] + 0.2, s
