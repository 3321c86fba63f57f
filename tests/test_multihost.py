"""Two processes on 127.0.0.1 (CPU devices, gloo collectives) through the real launcher.

Each process has its own shard of the examples (SFT) or prompts (GRPO); together they
make the global batch. The metrics must equal a one-process run on as many devices, in
this test's process, fed the same global batch: the shards' rows, in process order.
"""
import json
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import rl as rl_config
from configs import sft as sft_config
from data_pipeline import build as data_build
from data_pipeline import grain_pipeline
from deepimagine_jax import jobs
from deepimagine_jax import metrics_log
from deepimagine_jax import rl as rl_lib
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


def _launch_two(workdir, config: str, overrides, devices: int = 1) -> list[str]:
  """Two launcher processes of `devices` CPU devices each; their logs (both must succeed)."""
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, str(REPO / "launch" / "main.py"), f"--config={REPO}/configs/{config}",
       f"--workdir={workdir}", *overrides, "--config.mesh.multihost=True",
       f"--config.mesh.coordinator_address=127.0.0.1:{port}", "--config.mesh.num_processes=2",
       f"--config.mesh.process_id={i}"],
      cwd=REPO, env=launch_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
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


@pytest.mark.slow  # about 40 s: 2 launcher processes (data build, compiles, SFT)
def test_two_processes_sft_equals_one_process(tmp_path):
  overrides = [f"--config.sft.steps={STEPS}", f"--config.sft.checkpoint_every={STEPS}"]
  logs = _launch_two(tmp_path / "two", "sft.py:tiny", overrides)
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


# 40 SFT steps, enough for the tiny model to write a parseable DECISION now and then at
# temperature 1 (after fewer, every reward is 0 and GRPO's loss is 0 in any layout), then
# two GRPO steps without warm-up (the second samples from an updated policy, so its KL to
# the reference is not 0); eval kept to a couple of questions.
GRPO_OVERRIDES = {"sft.steps": 40, "sft.checkpoint_every": 40, "rl.steps": 2,
                  "rl.checkpoint_every": 2, "rl.optimizer.warmup_steps": 0,
                  "eval.max_questions": 2, "eval.pair_eval": False}
# Read from the gathered samples: identical samples give identical values.
EXACT = ("reward_mean", "reward_std", "reward_correctness", "reward_format", "accuracy",
         "format_failure_rate", "tie_rate", "completion_length", "completion_tokens",
         "zero_spread_groups")
# The same partitioned program on a data=4 mesh in both runs; only the cross-device sums
# run over gloo between processes instead of inside one, so float32's last bits may differ.
CLOSE = ("loss", "kl", "grad_norm", "entropy", "ratio_mean", "logprob_gap")


@pytest.mark.slow  # about 2 CPU-minutes: 2 launcher processes (compiles, SFT, GRPO, eval)
def test_two_processes_grpo_equals_one_process(tmp_path):
  """Samples, rewards and GRPO metrics of 2 hosts x 2 devices equal 1 host x 4 devices.

  Sampling does not depend on the layout: the sampler's uniforms are one draw of the
  global [B, C] array (threefry is partitionable, so a value depends on its global
  index, not on the device or host holding it)."""
  logs = _launch_two(tmp_path / "two", "rl.py:tiny",
                     [f"--config.{k}={v}" for k, v in GRPO_OVERRIDES.items()], devices=2)
  assert "4 devices (cpu) over 2 processes" in logs[0]
  two = metrics_log.read_metrics(tmp_path / "two" / "rl")
  assert [r["step"] for r in two] == [1, 2]
  # The comparison means something: rewards differ inside some groups, the policy moved.
  assert min(r["zero_spread_groups"] for r in two) < 8 and two[1]["kl"] > 0, two
  data_item = tmp_path / "two" / "rl" / "checkpoints" / "2" / "data" / "metadata"
  assert len(json.loads(data_item.read_text())["per_process"]) == 2  # each host's prompt position

  config = rl_config.get_config("tiny")
  config.update_from_flattened_dict(GRPO_OVERRIDES)
  run = RunConfig.from_config(config)
  built = data_build.build_dataset(run.data, tmp_path / "two", train_tokenizer=Tokenizer.train)
  assert built.report["reused"]
  mesh = sharding.make_mesh(4, 1, 1, devices=jax.devices()[:4])
  # The SFT policy both runs start GRPO from (exported in float32: the same bits).
  graphdef, params, tokenizer = jobs.load_policy(str(tmp_path / "two" / "sft"), mesh,
                                                 run.model.dtype)
  hosts = [jobs.grpo_prompts(run, built, tokenizer, shard_index=i, shard_count=2)
           for i in range(2)]
  rl_lib.run_grpo(run.rl, mesh, graphdef, params, params, _Concat([p for p, _ in hosts]),
                  tokenizer, str(tmp_path / "one"), seed=run.seed, ref_handle={},
                  balance=hosts[0][1])
  one = metrics_log.read_metrics(tmp_path / "one")
  assert [r["step"] for r in one] == [1, 2]
  for key in EXACT:
    assert [r[key] for r in two] == [r[key] for r in one], key
  for key in CLOSE:
    np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=1e-5,
                               atol=1e-7, err_msg=key)
