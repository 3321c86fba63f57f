"""CT Open evaluation: baselines (uniform, majority, TF-IDF LR / RF) and, given a run, the model.

  python launch/main.py --config=configs/eval.py --workdir=runs/eval                 # baselines only
  python launch/main.py --config=configs/eval.py --workdir=runs/eval --config.eval.checkpoint=runs/rl
Prints one table (per category and overall) and writes runs/eval/report/.
"""
import ml_collections

from configs import common


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant:
    raise ValueError(f"configs/eval.py has no variants, got {variant!r}")
  c = ml_collections.ConfigDict()
  c.job = "eval"
  c.workdir = "runs/eval"
  c.seed = 0
  c.model = common.model("small")
  c.mesh = common.mesh()
  c.data = common.data()
  c.eval = common.eval_()
  return c
