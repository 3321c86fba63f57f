"""Input pipeline throughput: Examples -> sharded token batches.

  python bench/data_pipeline.py [--pack] [--consumer_examples_per_s 850]

Examples are CT Open questions rendered by data_pipeline.templates. The tokenizer is trained on
their prompts unless --tokenizer names a model. Prints one line: the pipeline's
examples/s (and real tokens/s), and, given the train step's consumption rate,
their ratio (above 1 means the input pipeline keeps up).
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from data_pipeline import grain_pipeline as gp  # noqa: E402
from data_pipeline import templates  # noqa: E402
from data_pipeline.build_report import BuildReport  # noqa: E402
from data_pipeline.data_root import resolve_data_root  # noqa: E402
from data_pipeline.example import Example  # noqa: E402
from data_pipeline.readers import ct_open  # noqa: E402
from deepimagine_jax.tokenizer import Tokenizer  # noqa: E402


def ct_open_examples(root: pathlib.Path) -> list[Example]:
  """CT Open Winter + Summer questions, rendered by data_pipeline.templates."""
  report = BuildReport()
  examples = []
  for name in ("Winter_2025", "Summer_2025"):
    examples += ct_open.read_questions(root / "ct_open" / f"{name}.pickle", report, split=name)
  return [templates.render(ex) for ex in examples]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=200)
  parser.add_argument("--pack", action="store_true")
  parser.add_argument("--tokenizer", default="", help="tokenizer.model; default: train one")
  parser.add_argument("--vocab_size", type=int, default=8000)
  parser.add_argument("--consumer_examples_per_s", type=float, default=0.0)
  args = parser.parse_args()

  examples = ct_open_examples(resolve_data_root(None, allow_download=False))
  if args.tokenizer:
    tok = Tokenizer.load(args.tokenizer)
  else:
    tok = Tokenizer.train([e.prompt + "\n" + e.completion for e in examples],
                          tempfile.mkdtemp(), vocab_size=args.vocab_size)
  n_dev = jax.device_count()
  mesh = jax.make_mesh((n_dev, 1, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
  it = gp.make_sft_iterator(examples, tok, seq_len=args.seq_len, global_batch_size=args.batch,
                            seed=0, pack=args.pack)

  def step():
    batch_np = next(it)
    seg = batch_np["segment_ids"]
    n_ex = sum(len(np.unique(row[row > 0])) for row in seg)
    arrays = gp.to_global_arrays(batch_np, {k: sharding for k in batch_np})
    jax.block_until_ready(arrays)
    return n_ex, int((seg > 0).sum())

  for _ in range(5):  # warm up threads and prefetch
    step()
  n_ex = n_tok = 0
  t0 = time.perf_counter()
  for _ in range(args.batches):
    e, t = step()
    n_ex += e
    n_tok += t
  dt = time.perf_counter() - t0
  rate = n_ex / dt
  line = (f"data_pipeline: {rate:.0f} examples/s, {n_tok / dt:.0f} real tokens/s "
          f"(seq_len={args.seq_len} batch={args.batch} pack={args.pack} "
          f"examples={len(examples)} vocab={tok.vocab_size} devices={n_dev} "
          f"{args.batches} batches in {dt:.2f}s)")
  if args.consumer_examples_per_s > 0:
    line += f"; pipeline/consumer = {rate / args.consumer_examples_per_s:.2f}"
  print(line)


if __name__ == "__main__":
  main()
