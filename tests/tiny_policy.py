"""A tiny policy that writes a short reasoning line then a DECISION line, for the
serving and trace tests: trained once per test run (a few seconds; xdist workers share it)
and exported like a finished run (`<run dir>/policy/`), so `jobs.load_policy` loads it.

Its labels are shuffled, so it answers at chance: some of its decisions are right,
some wrong, which is what rejection sampling needs.
"""
import fcntl
import functools
import os
import random
import tempfile

from data_pipeline import grain_pipeline, synthetic, templates
from deepimagine_jax import jobs, sft, sharding, train_state
from deepimagine_jax.config import LoopConfig, ModelConfig, OptimizerConfig, SFTConfig
from deepimagine_jax.tokenizer import Tokenizer

REASONING = "the dose moves the response."
STEPS = 80


def examples(n: int = 400, seed: int = 0):
  """Synthetic examples (train split) with the tiny policy's completion layout."""
  rnd = random.Random(seed)
  return [e.replace(split="train",
                    completion=REASONING + "\n" + templates.decision_line(2, rnd.randrange(2)))
          for e in synthetic.make_synthetic(n, seed)]


@functools.lru_cache(maxsize=1)
def run_dir() -> str:
  """A run directory holding the trained tiny policy, built once per test run: the first
  xdist worker to ask trains it under a file lock in the run's shared folder (set in
  tests/conftest.py); the others wait for it. A failed build leaves no pointer, so the
  next caller builds afresh in a new folder."""
  shared = os.environ["DEEPIMAGINE_TEST_SHARED"]
  pointer = os.path.join(shared, "tiny-policy")
  with open(os.path.join(shared, "tiny-policy.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(pointer):
      d = _train(tempfile.mkdtemp(prefix="tiny-policy-", dir=shared))
      with open(pointer + ".tmp", "w") as f:
        f.write(d)
      os.replace(pointer + ".tmp", pointer)
    with open(pointer) as f:
      return f.read()


def _train(d: str) -> str:
  """Trains and exports the policy into the run directory `d`."""
  exs = examples()
  tok = Tokenizer.train([e.prompt + "\n" + e.completion for e in exs],
                        os.path.join(d, "tokenizer"), vocab_size=320)
  cfg = ModelConfig.tiny().replace(vocab_size=tok.vocab_size)
  mesh = sharding.make_mesh(-1, 1, 1)
  opt = OptimizerConfig(learning_rate=3e-3, warmup_steps=5, total_steps=STEPS, end_lr_ratio=0.1,
                        weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, grad_clip_norm=1.0,
                        grad_accum_steps=1)
  sft_cfg = SFTConfig(loop=LoopConfig(steps=STEPS, checkpoint_every=10_000, keep_checkpoints=1,
                                      log_every=STEPS, resume=False),
                      global_batch_size=32, kinds=("synthetic",), optimizer=opt, traces=(),
                      trace_order="reasoning_first", imagined=())
  batches = grain_pipeline.make_sft_iterator(exs, tok, seq_len=64, global_batch_size=32, seed=0)
  graphdef, params = train_state.init_params(cfg, mesh, 0)
  state = sft.run_sft(sft_cfg, mesh, graphdef, params, batches, os.path.join(d, "sft"), seed=0)
  jobs.export_policy(graphdef, state.params, cfg, tok, os.path.join(d, jobs.POLICY_DIR))
  return d
