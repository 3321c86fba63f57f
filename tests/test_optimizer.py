"""Optimizer: schedule vs closed form, clip + AdamW vs a NumPy reference, decay mask."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import typed_configs
from deepimagine_jax.optimizer import decay_mask, make_optimizer


def closed_form_lr(cfg, step):
  peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_ratio
  if step < cfg.warmup_steps:
    return peak * step / cfg.warmup_steps
  frac = min(step - cfg.warmup_steps, cfg.total_steps - cfg.warmup_steps) / max(
      cfg.total_steps - cfg.warmup_steps, 1)
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))


@pytest.mark.parametrize("warmup", [0, 10])
def test_schedule_matches_closed_form(warmup):
  cfg = typed_configs.optimizer(100, learning_rate=3e-4, warmup_steps=warmup, end_lr_ratio=0.1)
  _, sched = make_optimizer(cfg)
  for step in [0, 1, 5, warmup, warmup + 1, 37, 99, 100, 150]:
    np.testing.assert_allclose(float(sched(step)), closed_form_lr(cfg, step), rtol=1e-5, atol=1e-12)
  # The landmarks named in the brief, by hand.
  assert float(sched(0)) == pytest.approx(0.0 if warmup else 3e-4)
  assert float(sched(warmup)) == pytest.approx(3e-4, rel=1e-5)
  assert float(sched(100)) == pytest.approx(3e-5, rel=1e-5)


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match="warmup_steps"):
    typed_configs.optimizer(10, learning_rate=1e-3, warmup_steps=20)
  with pytest.raises(ValueError, match="learning_rate"):
    typed_configs.optimizer(10, learning_rate=0.0, warmup_steps=0)


def numpy_adamw(cfg, params, grads_seq, mask, clip):
  """Plain NumPy clip-by-global-norm + AdamW with the warmup-cosine schedule."""
  p = {k: np.array(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, g in enumerate(grads_seq, start=1):
    g = {k: np.array(x, np.float64) for k, x in g.items()}
    if clip:
      norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
      if norm > cfg.grad_clip_norm:
        g = {k: x * cfg.grad_clip_norm / norm for k, x in g.items()}
    lr = closed_form_lr(cfg, t - 1)
    for k in p:
      m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g[k]
      v[k] = cfg.b2 * v[k] + (1 - cfg.b2) * g[k] ** 2
      mhat = m[k] / (1 - cfg.b1 ** t)
      vhat = v[k] / (1 - cfg.b2 ** t)
      u = mhat / (np.sqrt(vhat) + cfg.eps) + (cfg.weight_decay * p[k] if mask[k] else 0.0)
      p[k] = p[k] - lr * u
  return p


def test_clip_and_adamw_match_numpy():
  cfg = typed_configs.optimizer(6, learning_rate=1e-1, warmup_steps=2, grad_clip_norm=1.0, weight_decay=0.1)
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(3, 4)).astype(np.float32),
            "b": rng.normal(size=(4,)).astype(np.float32)}
  # Gradient norms well above and below the clip threshold, so clipping changes the
  # relative size of steps and therefore Adam's moments.
  scales = [50.0, 0.1, 20.0, 0.05, 3.0, 0.2]
  grads_seq = [{k: (s * rng.normal(size=x.shape)).astype(np.float32) for k, x in params.items()}
               for s in scales]
  tx, _ = make_optimizer(cfg)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for g in grads_seq:
    upd, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, upd)
  mask = {"w": True, "b": False}
  want = numpy_adamw(cfg, params, grads_seq, mask, clip=True)
  unclipped = numpy_adamw(cfg, params, grads_seq, mask, clip=False)
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=2e-5, atol=2e-6)
  # The reference without clipping lands elsewhere: clipping was exercised.
  assert max(np.abs(want[k] - unclipped[k]).max() for k in params) > 1e-3


def test_clip_bounds_first_update_norm_without_adam():
  # Adam hides the gradient scale, so check the clip stage itself on the chain's first link.
  cfg = typed_configs.optimizer(10, learning_rate=1.0, warmup_steps=0, grad_clip_norm=0.5)
  tx, _ = make_optimizer(cfg)
  clip_state = tx.init({"w": jnp.zeros((2, 2))})[0]
  g = {"w": jnp.full((2, 2), 3.0)}  # global norm 6
  clipped, _ = optax.clip_by_global_norm(cfg.grad_clip_norm).update(g, clip_state)
  np.testing.assert_allclose(float(optax.global_norm(clipped)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(clipped["w"]), np.full((2, 2), 3.0 * 0.5 / 6.0), rtol=1e-6)


class _Tiny(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(3, 4, use_bias=True, rngs=rngs)
    self.norm = nnx.RMSNorm(4, rngs=rngs)
    self.embed = nnx.Embed(5, 4, rngs=rngs)


def test_decay_mask_on_nnx_state():
  params = nnx.state(_Tiny(nnx.Rngs(0)), nnx.Param)
  flat = {tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]}
  assert flat[("lin", "kernel", "value")] is True
  assert flat[("lin", "bias", "value")] is False
  assert flat[("norm", "scale", "value")] is False
  assert flat[("embed", "embedding", "value")] is True


def test_weight_decay_only_touches_masked_leaves():
  # Zero gradients: Adam's term is 0, so the whole update is -lr * wd * p on decayed leaves.
  cfg = typed_configs.optimizer(10, learning_rate=0.5, warmup_steps=0, weight_decay=0.2)
  tx, sched = make_optimizer(cfg)
  params = {"w": jnp.ones((2, 3)), "b": jnp.ones((3,)), "proj_bias": jnp.ones((2, 3))}
  state = tx.init(params)
  upd, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  np.testing.assert_allclose(np.asarray(upd["w"]), -float(sched(0)) * 0.2 * np.ones((2, 3)), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(upd["b"]), 0.0)
  np.testing.assert_array_equal(np.asarray(upd["proj_bias"]), 0.0)
