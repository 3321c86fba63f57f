"""The train state (params, optimizer state, step, rng) and how it is born sharded.

SFT and RL share it. The state is a plain pytree; the model's graph definition
is static and lives beside it. Parameters come from outside (a fresh random
model from `init_params`, or imported weights): the state is built around
them, never around a throw-away random model.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from deepimagine_jax import model as model_lib
from deepimagine_jax import sharding
from deepimagine_jax.config import ModelConfig


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # nnx.State of the model's Params
  opt_state: Any
  rng: jax.Array


def init_params(model_cfg: ModelConfig, mesh, seed: int):
  """(graphdef, params) of a randomly initialised model, created already sharded."""
  model = sharding.create_sharded(lambda: model_lib.Transformer(model_cfg, nnx.Rngs(seed)), mesh)
  return nnx.split(model)


def opt_state_shardings(opt_abstract, params, param_sh, mesh):
  """Optimizer moments (subtrees shaped like the params) take the params' shardings."""
  structure = jax.tree.structure(params)
  rep = sharding.replicated(mesh)

  def is_param_like(node):
    return jax.tree.structure(node) == structure and not hasattr(node, "shape")

  return jax.tree.map(lambda n: param_sh if is_param_like(n) else rep, opt_abstract,
                      is_leaf=is_param_like)


def state_from_params(params, tx, mesh, seed: int):
  """(TrainState at step 0 around `params`, its shardings); the optimizer state born sharded."""
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  opt_sh = opt_state_shardings(jax.eval_shape(tx.init, params), params, param_sh, mesh)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
  rep = sharding.replicated(mesh)
  state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=params,
                     opt_state=opt_state,  # a typed key is created in place (device_put of
                     # one cannot reach another process's devices)
                     rng=jax.jit(lambda: jax.random.key(seed), out_shardings=rep)())
  return state, jax.tree.map(lambda x: x.sharding, state)

