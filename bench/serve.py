"""Load test of the OpenAI-compatible server: requests/s and p50 / p99 latency at 1, 8 and
32 concurrent clients, with batching on (one sampler call of up to 32 rows) and off
(batch size 1: one request per call). Prints one line.

  python bench/serve.py                      # a random `small` model, synthetic prompts
  python bench/serve.py --checkpoint=runs/rl # a trained run's policy

A random model rarely emits EOS, so every request generates its full --max_tokens:
the load is the same for every setting. Each server compiles its row buckets
(1, 2, 4, .. rows) before timing starts.
"""
import argparse
import asyncio
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from configs import common  # noqa: E402
from data_pipeline import synthetic  # noqa: E402
from deepimagine_jax import jobs, serve, sharding, train_state  # noqa: E402
from deepimagine_jax.config import ModelConfig  # noqa: E402
from deepimagine_jax.serve_config import ServeConfig, typed  # noqa: E402
from deepimagine_jax.tokenizer import Tokenizer  # noqa: E402

CLIENTS = (1, 8, 32)


def policy(args, mesh):
  if args.checkpoint:
    return jobs.load_policy(args.checkpoint, mesh, "float32")
  examples = synthetic.make_synthetic(500, 0)
  tok = Tokenizer.train([e.prompt + "\n" + e.completion for e in examples],
                        tempfile.mkdtemp(prefix="bench-serve-"), vocab_size=320)
  cfg = getattr(ModelConfig, args.preset)().replace(vocab_size=tok.vocab_size)
  graphdef, params = train_state.init_params(cfg, mesh, 0)
  return graphdef, params, tok


async def load(url: str, prompts: list[str], clients: int, n_requests: int, max_tokens: int):
  """(requests/s, latencies in s) of n_requests sent by `clients` concurrent loops."""
  latencies, todo = [], list(range(n_requests))
  async with httpx.AsyncClient(timeout=600) as client:
    async def worker():
      while todo:
        i = todo.pop()
        t0 = time.perf_counter()
        r = await client.post(url, json={
            "model": "deepimagine-policy", "max_tokens": max_tokens, "temperature": 1.0,
            "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]})
        r.raise_for_status()
        latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
  return n_requests / (time.perf_counter() - t0), latencies


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--checkpoint", default="")
  ap.add_argument("--preset", default="small")
  ap.add_argument("--max_tokens", type=int, default=32)
  ap.add_argument("--rounds", type=int, default=2, help="requests per client per setting")
  args = ap.parse_args()
  mesh = sharding.make_mesh(-1, 1, 1)
  graphdef, params, tok = policy(args, mesh)
  prompts = [e.prompt for e in synthetic.make_synthetic(64, 1)]
  parts = []
  for name, batch in (("on", max(CLIENTS)), ("off", 1)):
    c = common.serve()
    c.batch_size, c.prompt_len, c.max_new_tokens = batch, 64, args.max_tokens
    engine = serve.Engine(graphdef, params, tok, typed(ServeConfig, c), mesh)
    engine.warmup(temperature=1.0, top_p=1.0, max_tokens=args.max_tokens)
    with serve.ServerThread(serve.make_app(engine)) as server:
      url = server.base_url + "/chat/completions"
      cells = []
      for clients in CLIENTS:
        rps, lat = asyncio.run(load(url, prompts, clients, clients * args.rounds,
                                    args.max_tokens))
        p50, p99 = np.percentile(lat, [50, 99])
        cells.append(f"{clients}: {rps:.1f} req/s p50 {p50:.2f}s p99 {p99:.2f}s")
    parts.append(f"batching {name} [" + "; ".join(cells) + "]")
  what = args.checkpoint or f"random {args.preset}"
  print(f"serve ({what}, {args.max_tokens} new tokens, clients 1/8/32): " + " | ".join(parts))


if __name__ == "__main__":
  main()
