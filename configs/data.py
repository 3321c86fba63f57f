"""Builds (or reuses) the counterfactual example dataset and tokenizer, prints a report.

  python launch/main.py --config=configs/data.py --workdir=runs/data
  python launch/main.py --config=configs/data.py --config.data.root=/path/to/data --config.data.tfds=True
"""
import ml_collections

from configs import common


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant:
    raise ValueError(f"configs/data.py has no variants, got {variant!r}")
  c = ml_collections.ConfigDict()
  c.job = "data"
  c.workdir = "runs/data"
  c.seed = 0
  c.data = common.data()
  return c
