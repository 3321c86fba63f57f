"""loop.run: the training loop SFT and GRPO share, on a counter "model" (no JAX model needed)."""
import contextlib
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import disk_limit
import typed_configs
from deepimagine_jax import checkpoint as ckpt_lib
from deepimagine_jax import loop
from deepimagine_jax import metrics_log
from deepimagine_jax import sharding
from deepimagine_jax.train_state import TrainState


def _state(mesh):
  state = TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros((3,), jnp.float32)},
                     opt_state={}, rng=jax.random.key(0))
  return jax.device_put(state, sharding.replicated(mesh))


def _data():
  return iter(grain.MapDataset.source(list(range(100))).map(lambda i: np.float32(i)))


def _step(nan_at=None):
  """Adds the batch to w; the metric `loss` is the batch (NaN at step nan_at)."""

  def step_fn(state, step, batch):
    state = state.replace(step=state.step + 1, params={"w": state.params["w"] + batch})
    loss = jnp.float32(np.nan) if step == nan_at else jnp.asarray(batch)
    return state, {"loss": loss, "grad_norm": jnp.float32(1.0)}

  return step_fn


def _run(workdir, steps, *, stop_after=None, nan_at=None, meta=None):
  cfg = typed_configs.loop(steps, checkpoint_every=3, log_every=100)
  seen = []

  def summarize(step, metrics, seconds):
    seen.append(step)
    return {**metrics, "seconds": seconds}

  mesh = sharding.make_mesh(-1, 1, 1)
  state = loop.run(cfg, str(workdir), mesh, _state(mesh), _data(),
                   _step(nan_at), summarize=summarize, meta=meta, stop_after=stop_after)
  return state, seen


def test_runs_writes_every_step_and_checkpoints_on_the_grid(tmp_path):
  state, seen = _run(tmp_path, 7, meta={"reference": {"dir": "x"}})
  assert int(state.step) == 7 and seen == list(range(1, 8))
  np.testing.assert_array_equal(np.asarray(state.params["w"]), np.full(3, sum(range(7))))
  rows = metrics_log.read_metrics(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, 8))
  assert [r["loss"] for r in rows] == [float(i) for i in range(7)]
  ck = ckpt_lib.Checkpointer(tmp_path / "checkpoints", max_to_keep=3, save_every=3)
  assert ck.all_steps() == [3, 6, 7]  # the grid and the last step
  _, data_state, meta = ck.restore(7, ckpt_lib.abstract_state(state))
  assert meta == {"reference": {"dir": "x"}} and data_state is not None
  ck.close()


def test_killed_run_resumes_to_the_same_end(tmp_path):
  full, _ = _run(tmp_path / "a", 8)
  _run(tmp_path / "b", 8, stop_after=5)  # killed during step 5: newest checkpoint is step 3
  resumed, seen = _run(tmp_path / "b", 8)
  assert seen == [4, 5, 6, 7, 8]  # resumed from step 3, data position included
  np.testing.assert_array_equal(np.asarray(full.params["w"]), np.asarray(resumed.params["w"]))
  rows = metrics_log.read_metrics(tmp_path / "b" / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, 9))


def test_nan_metric_stops_before_its_checkpoint(tmp_path):
  with pytest.raises(metrics_log.NonFiniteLossError, match="step 6"):
    _run(tmp_path, 9, nan_at=6)
  ck = ckpt_lib.Checkpointer(tmp_path / "checkpoints", max_to_keep=3, save_every=3)
  assert ck.latest_step() == 3  # step 6's state was never saved: its metrics were NaN
  ck.close()


def test_damaged_newest_checkpoint_resumes_from_the_previous(tmp_path, caplog):
  full, _ = _run(tmp_path / "a", 8)
  _run(tmp_path / "b", 8, stop_after=7)  # checkpoints at steps 3 and 6
  data_file = tmp_path / "b" / "checkpoints" / "6" / "data" / "metadata"
  data_file.write_bytes(data_file.read_bytes()[:5])  # a truncated iterator state
  resumed, seen = _run(tmp_path / "b", 8)
  assert seen == [4, 5, 6, 7, 8]  # from step 3, with step 3's data position
  assert any("checkpoints/6 is damaged" in r.getMessage() for r in caplog.records)
  np.testing.assert_array_equal(np.asarray(full.params["w"]), np.asarray(resumed.params["w"]))


def test_failed_save_stops_the_run_with_earlier_checkpoints_intact(tmp_path):
  """A full disk from step 4 on: step 6's save fails in the background; the run stops."""
  noise = np.random.default_rng(0).normal(size=(256, 1024)).astype(np.float32)
  cfg = typed_configs.loop(12, checkpoint_every=3, log_every=100)
  mesh = sharding.make_mesh(-1, 1, 1)
  state = _state(mesh).replace(opt_state={"noise": jnp.zeros(noise.shape, jnp.float32)})
  inner = _step()
  limit = contextlib.ExitStack()

  def step_fn(state, step, batch):
    if step == 4:  # step 3's checkpoint (noise still zeros: tiny) is written by now
      state = state.replace(opt_state={"noise": jnp.asarray(noise)})
      limit.enter_context(disk_limit.file_size_limit(256 * 1024))
    time.sleep(0.05)  # a step takes time; the failed write surfaces within a few
    return inner(state, step, batch)

  with limit, pytest.raises(ckpt_lib.CheckpointSaveError, match="saving step 6") as err:
    loop.run(cfg, str(tmp_path), mesh, state, _data(), step_fn,
             summarize=lambda step, m, s: m)
  assert "\n" not in str(err.value) and "steps [3]" in str(err.value)
  ck = ckpt_lib.Checkpointer(tmp_path / "checkpoints", max_to_keep=3, save_every=3)
  step, restored, data_state, _ = ck.restore_latest(ckpt_lib.abstract_state(state))
  ck.close()
  assert step == 3 and int(restored.step) == 3
  np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.full(3, 0 + 1 + 2))
  assert [r["step"] for r in metrics_log.read_metrics(tmp_path / "metrics.jsonl")][-1] < 12
