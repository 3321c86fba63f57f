"""Plots GRPO's learning curve on the synthetic dose-response task (docs/synthetic_reward.png).

  python bench/synthetic_rl.py
Prints one line: mean accuracy over the first and last 20 steps, and the step count.
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402
import numpy as np  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from deepimagine_jax import synthetic_rl  # noqa: E402


def main():
  out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                     "synthetic_reward.png")
  with tempfile.TemporaryDirectory() as d:
    rows = synthetic_rl.run(d)
  steps = np.array([r["step"] for r in rows])
  acc = np.array([r["accuracy"] for r in rows])
  w = 10  # moving average over the last w steps (fewer at the start)
  smooth = np.array([acc[max(0, i - w + 1):i + 1].mean() for i in range(len(acc))])
  fig, ax = plt.subplots(figsize=(7, 3.4))
  ax.plot(steps, acc, lw=0.8, alpha=0.3, color="C0", label="accuracy per step")
  ax.plot(steps, smooth, lw=2, color="C0", label=f"moving average ({w} steps)")
  ax.axhline(0.5, color="grey", ls=":", label="chance")
  ax.axhline(0.9, color="green", ls="--", lw=0.8, label="target 0.9")
  ax.set_xlabel("GRPO step")
  ax.set_ylabel("accuracy of the sampled answers")
  ax.set_ylim(0, 1.05)
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
  ax.set_title("tiny policy, synthetic dose-response task")
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  s = synthetic_rl.summary(rows)
  print(f"synthetic_rl | accuracy first20 {s['first']:.3f} -> last20 {s['last']:.3f} "
        f"over {s['steps']} steps | plot {out}")


if __name__ == "__main__":
  main()
