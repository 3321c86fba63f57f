"""SFT: the masked loss, the train step, overfitting, and exact resume."""
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from deepimagine_jax import metrics_log
from deepimagine_jax import model as model_lib
from deepimagine_jax import sft
from deepimagine_jax import sharding
from deepimagine_jax.config import ModelConfig
import typed_configs
from deepimagine_jax import train_state

CFG = ModelConfig.tiny().replace(vocab_size=64, n_layers=1, mlp_dim=64)
T = 16


def _rows(n, seed=0):
  """Fixed sequences; the loss covers the second half of each (the "completion")."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    ids = rng.integers(4, CFG.vocab_size, size=T + 1).astype(np.int32)
    mask = np.zeros(T, np.float32)
    mask[T // 2:] = 1.0
    rows.append({"inputs": ids[:-1], "targets": ids[1:], "loss_mask": mask,
                 "positions": np.arange(T, dtype=np.int32),
                 "segment_ids": np.ones(T, np.int32)})
  return rows


def _batches(rows, batch_size, seed=0):
  ds = grain.MapDataset.source(rows).shuffle(seed=seed).repeat(None).batch(batch_size)
  return iter(ds)


def test_masked_loss_matches_numpy():
  model = model_lib.Transformer(CFG, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  rows = _rows(2)
  batch = {k: jnp.stack([r[k] for r in rows]) for k in rows[0]}
  batch["loss_mask"] = batch["loss_mask"].at[0, 3].set(1.0)  # an irregular mask
  loss_sum, n = jax.jit(sft.masked_nll_sum, static_argnums=1)(params, graphdef, batch)
  forward = jax.jit(lambda p, x, pos: nnx.merge(graphdef, p)(x, pos)[0])  # eager: op by op
  logits = np.asarray(forward(params, batch["inputs"], batch["positions"]), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  tgt = np.asarray(batch["targets"])
  nll = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
  m = np.asarray(batch["loss_mask"])
  np.testing.assert_allclose(float(loss_sum), (nll * m).sum(), rtol=1e-5)
  assert float(n) == m.sum()


def _opt(steps, lr=3e-3, accum=1):
  return typed_configs.optimizer(steps, learning_rate=lr, warmup_steps=0, weight_decay=0.0,
                                 grad_accum_steps=accum)


def _run(cfg, mesh, batches, workdir, stop_after=None):
  graphdef, params = train_state.init_params(CFG, mesh, seed=0)
  return sft.run_sft(cfg, mesh, graphdef, params, batches, str(workdir), seed=0,
                     stop_after=stop_after)


def test_accumulation_equals_one_big_batch():
  mesh = sharding.make_mesh(-1, 1, 1)
  rows = _rows(8)
  batch = {k: jnp.stack([r[k] for r in rows]) for k in rows[0]}
  batch["loss_mask"] = batch["loss_mask"].at[:2].set(0.0).at[0, -1].set(1.0)  # uneven counts
  outs = []
  for accum in (1, 4):
    # Plain SGD (lr 1) so the parameter change *is* the gradient: Adam's first step
    # divides by |g| and would turn float noise on near-zero gradients into +-lr.
    tx = optax.sgd(1.0)
    graphdef, params = train_state.init_params(CFG, mesh, seed=0)
    state, _ = train_state.state_from_params(params, tx, mesh, seed=0)
    new, metrics = jax.jit(lambda s, b: sft.train_step(s, b, graphdef=graphdef, tx=tx,
                                                       accum_steps=accum))(state, batch)
    outs.append((jax.tree.leaves(new.params), float(metrics["loss"])))
  assert outs[0][1] == pytest.approx(outs[1][1], rel=1e-5)
  for a, b in zip(outs[0][0], outs[1][0]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_one_step_lowers_loss_and_overfits(tmp_path):
  mesh = sharding.make_mesh(2, 2, 2)
  rows = _rows(4)
  cfg = typed_configs.sft(60, 4, _opt(60, lr=1e-2), checkpoint_every=1000, log_every=1000)
  state = _run(cfg, mesh, _batches(rows, 4), tmp_path)
  logs = metrics_log.read_metrics(tmp_path / "metrics.jsonl")
  losses = [r["loss"] for r in logs]
  assert len(losses) == 60
  assert losses[1] < losses[0]
  assert losses[-1] < 0.05, losses[-5:]
  assert int(state.step) == 60


def test_resume_matches_uninterrupted(tmp_path):
  mesh = sharding.make_mesh(2, 2, 2)
  rows = _rows(12)
  cfg = typed_configs.sft(12, 4, _opt(12), checkpoint_every=3, log_every=1000)
  full = _run(cfg, mesh, _batches(rows, 4), tmp_path / "a")
  _run(cfg, mesh, _batches(rows, 4), tmp_path / "b", stop_after=7)
  # Killed after step 7: the newest checkpoint is step 6; a fresh process resumes from it.
  resumed = _run(cfg, mesh, _batches(rows, 4), tmp_path / "b")
  assert int(resumed.step) == 12
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(full.opt_state), jax.tree.leaves(resumed.opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  steps = [r["step"] for r in metrics_log.read_metrics(tmp_path / "b" / "metrics.jsonl")]
  assert steps == list(range(1, 13))


class _Poisoned:
  """`batches` (checkpointable: its state is the wrapped one's) with the `at`-th batch drawn
  from this wrapper (1-based) given a NaN loss mask, so that step's loss is NaN."""

  def __init__(self, batches, at):
    self.batches, self.at, self.n = batches, at, 0

  def __next__(self):
    batch = next(self.batches)
    self.n += 1
    if self.n == self.at:
      batch = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
    return batch

  def get_state(self):
    return self.batches.get_state()

  def set_state(self, state):
    self.batches.set_state(state)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  mesh = sharding.make_mesh(-1, 1, 1)
  rows = _rows(8)
  cfg = typed_configs.sft(8, 8, _opt(8), checkpoint_every=2, log_every=1000)
  _run(cfg, mesh, _batches(rows, 8), tmp_path, stop_after=4)
  # Resumed at 4, the batch of step 6 (a checkpoint step) gives a NaN loss: the run must stop
  # with a clear error before saving. The same program as the first run (nothing to compile).
  with pytest.raises(metrics_log.NonFiniteLossError, match="step 6"):
    _run(cfg, mesh, _Poisoned(_batches(rows, 8), at=2), tmp_path)
  from deepimagine_jax import checkpoint as ckpt_lib
  ck = ckpt_lib.Checkpointer(tmp_path / "checkpoints", max_to_keep=3, save_every=2)
  assert ck.latest_step() == 4
  ck.close()
