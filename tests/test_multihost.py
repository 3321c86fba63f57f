"""Two processes on 127.0.0.1 (CPU devices, gloo collectives) through the real launcher.

Each process has one device and its own shard of the examples; together they make
the global batch. The losses must equal a one-process run (two devices, in this
test's process) fed the same global batch: both shards' rows, in process order.
"""
import json
import socket
import subprocess
import sys

import jax
import numpy as np

from configs import sft as sft_config
from data_pipeline import build as data_build
from data_pipeline import grain_pipeline
from deepimagine_jax import jobs
from deepimagine_jax import metrics_log
from deepimagine_jax import sft as sft_lib
from deepimagine_jax import sharding
from deepimagine_jax import train_state
from deepimagine_jax.config import RunConfig
from deepimagine_jax.tokenizer import Tokenizer
from test_entry import REPO, launch_env

STEPS = 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch_two(workdir, overrides) -> list[str]:
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, str(REPO / "launch" / "main.py"), f"--config={REPO}/configs/sft.py:tiny",
       f"--workdir={workdir}", *overrides, "--config.mesh.multihost=True",
       f"--config.mesh.coordinator_address=127.0.0.1:{port}", "--config.mesh.num_processes=2",
       f"--config.mesh.process_id={i}"],
      cwd=REPO, env=launch_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=600)[0])
  finally:
    for p in procs:
      p.kill()
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i}:\n{log[-4000:]}"
  return logs


class _Concat:
  """The hosts' iterators side by side: one global batch, rows in process order."""

  def __init__(self, iterators):
    self.iterators = iterators

  def __next__(self):
    batches = [next(it) for it in self.iterators]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self):
    return [it.get_state() for it in self.iterators]

  def set_state(self, state):
    for it, s in zip(self.iterators, state):
      it.set_state(s)


def test_two_processes_sft_equals_one_process(tmp_path):
  overrides = [f"--config.sft.steps={STEPS}", f"--config.sft.checkpoint_every={STEPS}"]
  logs = _launch_two(tmp_path / "two", overrides)
  assert "data build: reusing" in logs[1]  # process 1 waited for process 0's build
  assert "2 devices (cpu) over 2 processes" in logs[0]
  two = metrics_log.read_metrics(tmp_path / "two")  # written by process 0 alone
  assert [r["step"] for r in two] == list(range(1, STEPS + 1))
  data_item = tmp_path / "two" / "checkpoints" / str(STEPS) / "data" / "metadata"
  per_process = json.loads(data_item.read_text())["per_process"]
  assert len(per_process) == 2  # each process's data position

  config = sft_config.get_config("tiny")
  config.sft.steps = STEPS
  run = RunConfig.from_config(config)
  built = data_build.build_dataset(run.data, tmp_path / "two", train_tokenizer=Tokenizer.train)
  assert built.report["reused"]
  tokenizer = Tokenizer.load(built.tokenizer_path)
  records = built.examples("train", kinds=run.sft.kinds)
  batches = _Concat([grain_pipeline.make_sft_iterator(
      records, tokenizer, seq_len=run.data.seq_len, global_batch_size=run.sft.global_batch_size,
      seed=run.seed, pack=run.data.pack, shard_index=i, shard_count=2) for i in range(2)])
  mesh = sharding.make_mesh(2, 1, 1, devices=jax.devices()[:2])
  graphdef, params = train_state.init_params(jobs.model_config(run.model, tokenizer), mesh,
                                             run.seed)
  sft_lib.run_sft(run.sft, mesh, graphdef, params, batches, str(tmp_path / "one"), seed=run.seed)
  one = metrics_log.read_metrics(tmp_path / "one")
  for key in ("loss", "grad_norm", "target_tokens"):
    np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=1e-6,
                               err_msg=key)
