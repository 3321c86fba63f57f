"""GRPO's learning curves on the synthetic dose task, one per seed (docs/synthetic_reward.png).

  python bench/synthetic_rl.py
Runs synthetic_rl.SEEDS one after another in this process and prints one line: each
seed's mean accuracy over its first and last 20 GRPO steps, and the step count.
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
  fig, ax = plt.subplots(figsize=(7, 3.4))
  w = 10  # moving average over the last w steps (fewer at the start)
  figures = []
  for i, seed in enumerate(synthetic_rl.SEEDS):
    with tempfile.TemporaryDirectory() as d:
      rows = synthetic_rl.run(d, seed=seed)
    steps = np.array([r["step"] for r in rows])
    acc = np.array([r["accuracy"] for r in rows])
    smooth = np.array([acc[max(0, j - w + 1):j + 1].mean() for j in range(len(acc))])
    ax.plot(steps, acc, lw=0.6, alpha=0.2, color=f"C{i}")
    ax.plot(steps, smooth, lw=2, color=f"C{i}", label=f"seed {seed} ({w}-step mean)")
    s = synthetic_rl.summary(rows)
    figures.append(f"seed {seed} {s['first']:.3f} -> {s['last']:.3f}")
  ax.axhline(0.5, color="grey", ls=":", label="chance")
  ax.axhline(synthetic_rl.BAR, color="green", ls="--", lw=0.8, label=f"bar {synthetic_rl.BAR}")
  ax.set_xlabel("GRPO step")
  ax.set_ylabel("accuracy of the sampled answers")
  ax.set_ylim(0, 1.05)
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
  ax.set_title("tiny policy, synthetic dose-response task")
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  print(f"synthetic_rl | accuracy first20 -> last20: {' | '.join(figures)} | "
        f"{s['steps']} steps each | plot {out}")


if __name__ == "__main__":
  main()
