"""The typed boundary: every job config becomes a RunConfig once; a bad key or value is
one ConfigError naming the key and what it may be, before any work."""
import dataclasses
import os

import jax
import pytest

from configs import data, eval as eval_config, rl, sft
from deepimagine_jax import sharding
from deepimagine_jax.config import ConfigError, RunConfig


@pytest.mark.parametrize("module,variant", [(rl, ""), (rl, "tiny"), (sft, ""), (sft, "tiny"),
                                            (eval_config, ""), (data, "")])
def test_every_config_becomes_typed(module, variant):
  config = module.get_config(variant)
  run = RunConfig.from_config(config)
  assert run.job == config.job and run.data.sources == tuple(config.data.sources)
  if "rl" in config:
    assert run.rl.loop.steps == config.rl.steps
    assert run.rl.optimizer.total_steps == config.rl.steps  # the optimizer spans the run
    assert run.rl.max_new_tokens == config.rl.max_new_tokens  # no default of its own
  if "sft" in config:
    assert run.sft.kinds == tuple(config.sft.kinds)
  if "eval" in config:
    assert run.eval.rf_seeds == tuple(config.eval.rf_seeds)


def test_bad_sections_name_the_key():
  config = rl.get_config()
  config.rl.kinds = ("question,chain",)  # what a comma string on the command line becomes
  with pytest.raises(ValueError, match="rl.kinds"):
    RunConfig.from_config(config)
  config = rl.get_config()
  config.data.sources = ("ct_open,synthetic",)
  with pytest.raises(ValueError, match="data.sources"):
    RunConfig.from_config(config)
  config = rl.get_config()
  config.eval.mode = "vote"
  with pytest.raises(ValueError, match="eval.mode"):
    RunConfig.from_config(config)
  config = rl.get_config()
  config.eval.walk = "per-arm"
  with pytest.raises(ValueError, match="eval.walk must be 'decision' or 'per_arm'"):
    RunConfig.from_config(config)


def _set(config, key: str, value):
  section, name = key.split(".")
  with config.unlocked():
    config[section][name] = value
  return config


@pytest.mark.parametrize("key,value,allowed", [
    ("sft.steps", -1, "an integer >= 1"),
    ("rl.steps", 0, "an integer >= 1"),
    ("rl.group_size", 0, "an integer >= 2"),
    ("rl.group_size", 1, "an integer >= 2"),
    ("rl.prompts_per_step", 0, "an integer >= 1"),
    ("rl.updates_per_rollout", 0, "an integer >= 1"),
    ("rl.beta", -0.1, "a number >= 0"),
    ("rl.checkpoint_every", 0, "an integer >= 1"),
    ("sft.keep_checkpoints", 0, "an integer >= 1"),
    ("sft.global_batch_size", 0, "an integer >= 1"),
    ("data.prompt_len", 513, "an integer in [1, data.seq_len=400]"),
    ("model.preset", "nope", "one of ("),
    ("model.dtype", "float16", "one of ('float32', 'bfloat16')"),
    ("model.hf_checkpoint", "/nonexistent/qwen", "a folder holding config.json"),
    ("data.root", "/nonexistent/data", "an existing folder"),
    ("rl.reward_weights", ("garbage",), "(name, weight) pairs"),  # what the flag gives
    ("rl.reward_weights", (("correctness", 1.0), ("nope", 0.1)), "names from ['brier'"),
    ("rl.reward_weights", (("correctness", "high"),), "(name, weight) pairs"),
    ("mesh.fsdp", 0, "-1 (all devices the other axes leave) or >= 1"),
    ("mesh.tensor", -1, "at most one -1"),
    ("mesh.coordinator_address", "10.0.0.1", "'host:port'"),
    ("mesh.num_processes", 0, "-1 (from the environment) or >= 1"),
    ("mesh.host_devices", -1, "0 (XLA's own) or the number of JAX devices"),
])
def test_bad_values_name_the_key_and_the_allowed_values(key, value, allowed):
  config = _set(rl.get_config(), key, value)
  with pytest.raises(ConfigError) as err:
    RunConfig.from_config(config)
  msg = str(err.value)
  assert msg.startswith(f"config.{key.split('.')[0]}") and key.split(".")[1] in msg, msg
  assert allowed in msg and "\n" not in msg, msg


def test_process_id_must_fit_the_process_count():
  config = _set(_set(rl.get_config(), "mesh.num_processes", 2), "mesh.process_id", 2)
  with pytest.raises(ConfigError, match=r"config.mesh.process_id=2: .* in \[0, 1\]"):
    RunConfig.from_config(config)


def test_unknown_and_missing_keys_name_the_section():
  config = _set(rl.get_config(), "rl.no_such_key", 1)
  with pytest.raises(ConfigError, match=r"config.rl: RLConfig: config keys \['no_such_key'\]"):
    RunConfig.from_config(config)
  config = rl.get_config()
  with config.unlocked():
    del config.mesh["tensor"]
  with pytest.raises(ConfigError, match=r"config.mesh: MeshConfig: fields \['tensor'\] have no"):
    RunConfig.from_config(config)


def test_section_errors_become_config_errors():
  config = _set(rl.get_config(), "rl.aggregation", "mean")  # RLConfig's own check
  with pytest.raises(ConfigError, match="config.rl.aggregation"):
    RunConfig.from_config(config)
  config = rl.get_config()
  config.rl.optimizer.learning_rate = -1.0  # OptimizerConfig's, inside the rl section
  with pytest.raises(ConfigError, match="config.rl: OptimizerConfig.learning_rate"):
    RunConfig.from_config(config)


def test_multihost_arguments_from_config_else_environment():
  mesh = RunConfig.from_config(rl.get_config()).mesh
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert sharding.distributed_args(mesh, env) == {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
  assert sharding.distributed_args(mesh, {}) == {  # JAX detects them (TPU, SLURM, ...)
      "coordinator_address": None, "num_processes": None, "process_id": None}
  given = dataclasses.replace(mesh, coordinator_address="127.0.0.1:5", num_processes=2,
                              process_id=0)
  assert sharding.distributed_args(given, env) == {
      "coordinator_address": "127.0.0.1:5", "num_processes": 2, "process_id": 0}
  with pytest.raises(ConfigError, match=r"\$JAX_PROCESS_ID='x'"):
    sharding.distributed_args(mesh, {"JAX_PROCESS_ID": "x"})


def test_splitting_the_cpu_host_is_refused_once_jax_has_started():
  """mesh.host_devices works only before XLA's CPU client starts (launch/main.py); after,
  it is one clear error and $XLA_FLAGS is left as it was (the launch test covers before)."""
  jax.devices()  # the backends start (in a whole session they have already)
  flags = os.environ.get("XLA_FLAGS")
  sharding.split_cpu_host(0)  # 0: XLA's own, nothing to do
  with pytest.raises(RuntimeError, match="mesh.host_devices: JAX's backends already started"):
    sharding.split_cpu_host(2)
  assert os.environ.get("XLA_FLAGS") == flags
