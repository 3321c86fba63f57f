"""LoRA: low-rank adapters on a frozen base, several named ones on one copy of it.

A targeted projection y = x W gains scale * (dropout(x) A_e) B_e for adapter e
(scale = alpha / rank, PEFT's convention; A random, B zero, so a new adapter
leaves the model's function unchanged). Adapter weights are `LoRAParam`, a
Variable type of their own and not an nnx.Param, so one filter separates them:
the trainers differentiate and checkpoint `partition(params)[0]` (the adapters,
with their optimizer state) and pass the base beside it, never donated.

The adapter a call uses is per row or per token (the model's `adapter` argument:
[B], gathered inside the projection, or [B, T] for packed rows whose examples
belong to different adapters, `route`), else the model's static `active_adapter`;
-1 is the base alone, which is how GRPO's reference runs on the very same base
arrays (`reference_graphdef`). `merged` folds one adapter into the base weights
(export, fast sampling). Shape letters as in model.py's legend (E named adapters,
r the rank).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deepimagine_jax import sharding
from deepimagine_jax.config import LoRAConfig


class LoRAParam(nnx.Variable):
  """An adapter weight: trained while the base's nnx.Param stay frozen."""


class Adapter(nnx.Module):
  """The update of one projection for each of E adapters: A [E, *in, r], B [E, r, *out].

  `ins` / `outs` are the projection's input and output shape letters ("D" -> "NH"
  for q), `weight` the name of the base weight it updates (merged).
  """

  def __init__(self, cfg: LoRAConfig, ins: str, outs: str, weight: str, sizes: dict,
               axes: dict, rngs: nnx.Rngs):
    E, r = len(cfg.adapters), cfg.rank
    fan_in = 1
    for c in ins:
      fan_in *= sizes[c]
    init = jax.nn.initializers.normal(stddev=fan_in ** -0.5)
    self.a = LoRAParam(init(rngs.params(), (E, *[sizes[c] for c in ins], r), jnp.float32),
                       logical_axes=(None, *[axes[c] for c in ins], "lora_rank"))
    self.b = LoRAParam(jnp.zeros((E, r, *[sizes[c] for c in outs]), jnp.float32),
                       logical_axes=(None, "lora_rank", *[axes[c] for c in outs]))
    self.ins, self.outs, self.weight = ins, outs, weight
    self.scale, self.dropout = cfg.scale, cfg.dropout
    self.salt = sum(ord(c) for c in weight)  # one dropout stream per projection of a layer

  def __call__(self, x, adapter, rng):
    """The update to add to x W. `adapter`: a scalar index, [B] per row or [B, T] per
    token, -1 where off."""
    dt = x.dtype
    if rng is not None and self.dropout > 0:
      keep = 1.0 - self.dropout
      kept = jax.random.bernoulli(jax.random.fold_in(rng, self.salt), keep, x.shape)
      x = jnp.where(kept, x / jnp.asarray(keep, dt), 0).astype(dt)
    i, o = self.ins, self.outs
    a, b = self.a[...].astype(dt), self.b[...].astype(dt)
    if jnp.ndim(adapter) == 0:
      xa_BTr = jnp.einsum(f"BT{i},{i}r->BTr", x, a[adapter])
      return jnp.einsum(f"BTr,r{o}->BT{o}", xa_BTr, b[adapter]) * jnp.asarray(self.scale, dt)
    if jnp.ndim(adapter) == 2:  # per token: every adapter's A, each token keeps its own
      onehot_BTE = (adapter[..., None] == jnp.arange(a.shape[0])).astype(dt)
      xa_BTEr = jnp.einsum(f"BT{i},E{i}r->BTEr", x, a) * onehot_BTE[..., None]
      return jnp.einsum(f"BTEr,Er{o}->BT{o}", xa_BTEr, b) * jnp.asarray(self.scale, dt)
    on_B = (adapter >= 0).astype(dt) * jnp.asarray(self.scale, dt)
    if a.shape[0] == 1:  # one adapter: no per-row gather of the weights
      xa_BTr = jnp.einsum(f"BT{i},{i}r->BTr", x, a[0])
      y = jnp.einsum(f"BTr,r{o}->BT{o}", xa_BTr, b[0])
    else:
      row_B = jnp.maximum(adapter, 0)
      xa_BTr = jnp.einsum(f"BT{i},B{i}r->BTr", x, a[row_B])
      y = jnp.einsum(f"BTr,Br{o}->BT{o}", xa_BTr, b[row_B])
    return y * on_B.reshape((-1,) + (1,) * (y.ndim - 1))


def adapter_index(cfg: LoRAConfig, name: str) -> int:
  """The index of a named adapter; an error naming the known ones."""
  if name not in cfg.adapters:
    raise ValueError(f"no LoRA adapter {name!r}: lora.adapters is {cfg.adapters}")
  return cfg.adapters.index(name)


def route(cfg: LoRAConfig | None, perturbation: str) -> int:
  """The adapter an example of this perturbation ('+'-joined factors, "" for none) uses.

  With cfg.route "factor", a single factor that names an adapter picks it (its local
  operator); everything else, and every example with route "active", uses adapter 0.
  """
  if cfg is None or not cfg.enabled:
    return -1
  if cfg.route == "factor" and perturbation in cfg.adapters[1:]:
    return cfg.adapters.index(perturbation)
  return 0


def routed_config(graphdef, params) -> LoRAConfig | None:
  """The model's LoRAConfig when its examples choose adapters by factor (route "factor"),
  else None (one adapter, the active one, serves every call)."""
  cfg = nnx.merge(graphdef, params).lora_cfg
  return cfg if cfg is not None and cfg.route == "factor" else None


def attach(graphdef, params, cfg: LoRAConfig, mesh, seed: int):
  """(graphdef, params) of the model with adapters added on its projections, born sharded.

  The base arrays are reused as they are (no copy); each adapter starts as the
  identity (B = 0). With rank 0 the model is returned unchanged.
  """
  if not cfg.enabled:
    return graphdef, params
  base = nnx.merge(graphdef, params)
  if base.lora_cfg is not None:
    raise ValueError("the model already has adapters")

  def make():
    return type(base)(base.cfg, nnx.Rngs(seed), lora=cfg)

  new_graphdef, abstract, _ = nnx.split(nnx.eval_shape(make), LoRAParam, ...)
  with jax.set_mesh(mesh):  # the base's init is traced but unused: XLA drops it
    adapters = jax.jit(lambda: nnx.split(make(), LoRAParam, ...)[1],
                       out_shardings=sharding.state_shardings(abstract, mesh))()
  return new_graphdef, nnx.merge_state(params, adapters)


def partition(params):
  """(trainable, frozen): the adapters and the base; without adapters all and nothing."""
  adapters, base = nnx.split_state(params, LoRAParam, ...)
  if not jax.tree.leaves(adapters):
    return params, adapters
  return adapters, base


def combine(trainable, frozen):
  """The one params tree (graphdef + params, as the sampler and prefix take it)."""
  return nnx.merge_state(frozen, trainable)


def reference_graphdef(graphdef, params):
  """The graphdef whose forward is the base alone (adapters off) on the same params."""
  model = nnx.merge(graphdef, params)
  if model.lora_cfg is None:
    raise ValueError("the model has no adapters to switch off")
  model.active_adapter = -1
  return nnx.split(model)[0]


def merged(model, adapter: int):
  """A model without adapters whose projections are W + scale * A_e B_e (e = `adapter`).

  In the scanned layout, per layer of the stack. Computed in one jit that keeps each weight's sharding, in the weights' dtype.
  """
  _, adapters, base = nnx.split(model, LoRAParam, ...)
  plain_graphdef = nnx.split(nnx.eval_shape(lambda: type(model)(model.cfg, nnx.Rngs(0))))[0]
  graphdef = nnx.graphdef(model)

  def delta(a, b):  # one layer's A [E, *in, r] and B [E, r, *out]
    return jnp.tensordot(a[adapter], b[adapter], axes=1)

  def fold(base, adapters):
    m = nnx.merge(graphdef, base, adapters)
    for path, module in m.iter_modules():
      stacked = model.cfg.scan_layers and path[:1] == ("layers",)  # a leading layer axis
      for ad in (getattr(module, "lora", None) or {}).values():
        w = getattr(module, ad.weight)
        d = (jax.vmap(delta) if stacked else delta)(ad.a[...], ad.b[...]) * ad.scale
        w.set_value((w[...].astype(jnp.float32) + d).astype(w.dtype))
    return nnx.state(m, nnx.Param)

  out_sh = jax.tree.map(lambda x: getattr(x, "sharding", None), base)
  new_base = jax.jit(fold, out_shardings=out_sh)(base, adapters)
  return nnx.merge(plain_graphdef, new_base)
