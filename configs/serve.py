"""Serves a trained run's policy behind an OpenAI-compatible endpoint.

  python launch/main.py --config=configs/serve.py --config.serve.checkpoint=runs/rl
  curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "deepimagine-policy", "max_tokens": 32,
         "messages": [{"role": "user", "content": "Trial: ..."}]}'
A tiny run (configs/sft.py:tiny) has max_seq_len 256: use the tiny variant,
  python launch/main.py --config=configs/serve.py:tiny --config.serve.checkpoint=runs/sft_tiny
"""
import ml_collections

from configs import common


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "serve"
  c.workdir = "runs/serve"
  c.seed = 0
  c.mesh = common.mesh()
  c.serve = common.serve()
  if variant == "tiny":
    c.serve.prompt_len = 128
    c.serve.max_new_tokens = 64
  elif variant:
    raise ValueError(f"configs/serve.py: unknown variant {variant!r} (have: tiny)")
  return c
