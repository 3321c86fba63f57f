"""Supervised fine-tuning: masked next-token loss, a pure train step, the loop.

The train state is a plain pytree (params, optimizer state, step, rng); the
model's graph definition is static and closed over by the jitted step, which is
built once per run with explicit in/out shardings and donates the state.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from deepimagine_jax import checkpoint as ckpt_lib
from deepimagine_jax import metrics_log
from deepimagine_jax import model as model_lib
from deepimagine_jax import sharding
from deepimagine_jax.config import ModelConfig
from deepimagine_jax.optimizer import OptimizerConfig, make_optimizer

BATCH_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # nnx.State of the model's Params
  opt_state: Any
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int
  global_batch_size: int
  seq_len: int
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  log_every: int = 10
  resume: bool = True


def token_nll(logits_BTV, targets_BT):
  """-log p(target) per position, in float32."""
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]


def masked_nll_sum(params, graphdef, batch):
  """Sum of completion-token NLL and the number of completion tokens."""
  model = nnx.merge(graphdef, params)
  logits_BTV, _ = model(batch["inputs"], batch["positions"], segment_ids_BT=batch["segment_ids"])
  nll_BT = token_nll(logits_BTV, batch["targets"])
  mask_BT = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum(jnp.where(mask_BT > 0, nll_BT, 0.0)), jnp.sum(mask_BT)


def train_step(state: TrainState, batch, *, graphdef, tx, accum_steps: int):
  """One optimizer update over a global batch split into `accum_steps` micro-batches.

  Gradients of the summed loss are accumulated and divided by the total number
  of completion tokens, so the update equals the one of a single big batch.
  """
  micro = jax.tree.map(
      lambda x: x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:]), batch)
  grad_fn = jax.value_and_grad(masked_nll_sum, has_aux=True)

  def body(carry, mb):
    g_acc, loss_acc, n_acc = carry
    (loss_sum, n), g = grad_fn(state.params, graphdef, mb)
    return (jax.tree.map(jnp.add, g_acc, g), loss_acc + loss_sum, n_acc + n), None

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (g_sum, loss_sum, n_tok), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), micro)
  denom = jnp.maximum(n_tok, 1.0)
  grads = jax.tree.map(lambda g: g / denom, g_sum)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss_sum / denom, "grad_norm": optax.global_norm(grads),
             "target_tokens": n_tok}
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def init_state(model_cfg: ModelConfig, tx, mesh, seed: int):
  """Creates a sharded model and its optimizer state; returns (graphdef, state, shardings)."""
  model = sharding.create_sharded(lambda: model_lib.Transformer(model_cfg, nnx.Rngs(seed)), mesh)
  graphdef, params = nnx.split(model)
  return graphdef, *_state_from_params(params, tx, mesh, seed)


def _state_from_params(params, tx, mesh, seed: int):
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  opt_sh = opt_state_shardings(jax.eval_shape(tx.init, params), params, param_sh, mesh)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
  rep = sharding.replicated(mesh)
  state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=params,
                     opt_state=opt_state, rng=jax.device_put(jax.random.key(seed), rep))
  return state, state_shardings(state)


def state_shardings(state):
  return jax.tree.map(lambda x: x.sharding, state)


def opt_state_shardings(opt_abstract, params, param_sh, mesh):
  """Optimizer moments (subtrees shaped like the params) take the params' shardings."""
  structure = jax.tree.structure(params)
  rep = sharding.replicated(mesh)

  def is_param_like(node):
    return jax.tree.structure(node) == structure and not hasattr(node, "shape")

  return jax.tree.map(lambda n: param_sh if is_param_like(n) else rep, opt_abstract,
                      is_leaf=is_param_like)


def check_batch(global_batch_size: int, accum_steps: int, mesh):
  """The batch must split into micro-batches that split over the batch axes."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch_size % (accum_steps * shards):
    raise ValueError(
        f"global_batch_size {global_batch_size} must be a multiple of grad_accum_steps "
        f"({accum_steps}) x data*fsdp mesh size ({shards})")


def make_jitted_step(graphdef, tx, accum_steps: int, state_sh, batch_sh):
  """The train step, jitted once for this run with shardings and state donation."""
  step = functools.partial(train_step, graphdef=graphdef, tx=tx, accum_steps=accum_steps)
  return jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                 donate_argnums=0)


def restore_or_init(checkpointer, state, shardings, resume: bool):
  """Resumes from the newest checkpoint when asked and present."""
  step = checkpointer.latest_step() if resume else None
  if step is None:
    return state, None
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, shardings)
  state, data_state, _ = checkpointer.restore(step, abstract)
  logging.info("resumed from checkpoint step %d", step)
  return state, data_state


def run_sft(model_cfg: ModelConfig, opt_cfg: OptimizerConfig, train_cfg: TrainConfig, mesh,
            batches: Iterator[dict], workdir: str, *, seed: int = 0,
            init_params=None, stop_after: int | None = None):
  """Trains for `train_cfg.steps` updates; resumes model, optimizer and data position.

  `batches` is a checkpointable Grain iterator of host-local numpy batches
  (design.md "Token batches"). `init_params` warm-starts from given parameters
  (e.g. an imported Hugging Face model). `stop_after` ends the run early at that
  step without a final save, as if the process had been killed (for tests).
  Returns (graphdef, final TrainState).
  """
  check_batch(train_cfg.global_batch_size, opt_cfg.grad_accum_steps, mesh)
  tx, schedule = make_optimizer(opt_cfg)
  graphdef, state, state_sh = init_state(model_cfg, tx, mesh, seed)
  if init_params is not None:
    state, state_sh = _state_from_params(init_params, tx, mesh, seed)
  batch_sh = {k: sharding.batch_sharding(mesh) for k in BATCH_KEYS}
  ckpt = ckpt_lib.Checkpointer(f"{workdir}/checkpoints", max_to_keep=train_cfg.keep_checkpoints,
                               save_every=train_cfg.checkpoint_every)
  state, data_state = restore_or_init(ckpt, state, state_sh, train_cfg.resume)
  if data_state is not None:
    batches.set_state(data_state)
  start = int(state.step)
  step_fn = make_jitted_step(graphdef, tx, opt_cfg.grad_accum_steps, state_sh, batch_sh)
  writer = metrics_log.MetricsWriter(workdir, train_cfg.steps, start_step=start + 1,
                                     log_every=train_cfg.log_every)
  pending = None  # (step, device metrics) of the previous step, read one step late

  def finish(step, metrics, n_tokens, dt):
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics_log.check_finite(step, metrics, keys=("loss", "grad_norm"))
    metrics["learning_rate"] = float(schedule(step - 1))
    metrics["tokens_per_s"] = n_tokens / max(dt, 1e-9)
    writer.write(step, metrics)

  t_last = time.perf_counter()
  try:
    with jax.set_mesh(mesh):
      for step in range(start + 1, train_cfg.steps + 1):
        if stop_after is not None and step > stop_after:
          break
        host_batch = next(batches)
        n_tokens = float(np.sum(host_batch["segment_ids"] > 0)) * jax.process_count()
        batch = {k: jax.make_array_from_process_local_data(batch_sh[k], host_batch[k])
                 for k in BATCH_KEYS}
        state, metrics = step_fn(state, batch)
        if pending is not None:
          finish(*pending)
        now = time.perf_counter()
        pending = (step, metrics, n_tokens, now - t_last)
        t_last = now
        if step % ckpt.save_every == 0 or step == train_cfg.steps:
          finish(*pending)  # never save a state whose loss we have not checked
          pending = None
          ckpt.save(step, state, data_state=batches.get_state(), force=True)
      if pending is not None:
        finish(*pending)
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
  return graphdef, state
