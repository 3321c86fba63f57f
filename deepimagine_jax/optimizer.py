"""AdamW with linear warmup + cosine decay and global-norm clipping.

Gradient accumulation is NOT done here: the trainers split a batch into
`grad_accum_steps` micro-batches and sum their gradients inside the jitted step
with `jax.lax.scan`, then apply this transformation once. That keeps one
optimizer update per train step and no `optax.MultiSteps` state to checkpoint.
"""
from collections.abc import Callable

import jax
import optax

from deepimagine_jax.config import OptimizerConfig


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _is_decayed(path, x) -> bool:
  """Decay matrices only: 1-D leaves (norm scales, biases) and anything named bias are skipped."""
  names = [_key_name(k) for k in path]
  # nnx.State leaves sit under a trailing `.value`; the parameter's own name comes before it.
  names = [n for n in names if n not in ("value", "raw_value")]
  if names and "bias" in names[-1].lower():
    return False
  return getattr(x, "ndim", 0) >= 2


def decay_mask(params):
  """Pytree of bools, same structure as `params`: True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(_is_decayed, params)


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  """lr(step): 0 -> peak linearly over warmup_steps, then cosine to peak*end_lr_ratio at total_steps."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=cfg.learning_rate,
      warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.total_steps,  # optax counts warmup inside decay_steps
      end_value=cfg.learning_rate * cfg.end_lr_ratio,
  )


def make_optimizer(cfg: OptimizerConfig) -> tuple[optax.GradientTransformation, Callable]:
  """Returns (clip -> AdamW transformation, schedule_fn) for the trainers.

  The schedule is evaluated at the optimizer's update count, so update k (0-based)
  uses schedule_fn(k); with warmup the very first update has lr 0.
  """
  schedule = make_schedule(cfg)
  adamw = optax.adamw(
      learning_rate=schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
      weight_decay=cfg.weight_decay, mask=decay_mask)
  if cfg.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
  else:
    tx = adamw
  return tx, schedule
