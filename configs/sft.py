"""Supervised fine-tuning on counterfactual examples (the RL warm start, alone).

  python launch/main.py --config=configs/sft.py --workdir=runs/sft
  python launch/main.py --config=configs/sft.py:tiny --workdir=/tmp/sft_tiny   # seconds
Override any key: --config.sft.steps=500 --config.model.preset=qwen3_0_6b
LoRA adapters instead of full training: --config.lora.rank=16 --config.lora.alpha=32
"""
import ml_collections

from configs import common


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "sft"
  c.workdir = "runs/sft"
  c.seed = 0
  c.model = common.model("small")
  c.mesh = common.mesh()
  c.data = common.data()
  c.sft = common.sft(steps=300, batch=16)
  c.lora = common.lora()  # rank 0: the whole model trains
  if variant == "tiny":
    c.workdir = "runs/sft_tiny"
    c.model.preset = "tiny"
    c.data.sources = ("synthetic",)
    c.data.vocab_size = 320
    c.data.seq_len = 64
    c.sft = common.sft(steps=3, batch=8)
    c.sft.kinds = ("synthetic",)
    c.sft.log_every = 1
  elif variant:
    raise ValueError(f"configs/sft.py: unknown variant {variant!r} (have: tiny)")
  return c
