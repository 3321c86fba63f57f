"""loop.run: the training loop SFT and GRPO share, on a counter "model" (no JAX model needed)."""
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
