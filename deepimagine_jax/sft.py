"""Supervised fine-tuning: masked next-token loss, a pure train step, the run.

The step is a module-level pure function jitted once per run with explicit
in/out shardings and state donation; the run around it (resume, metrics,
checkpoints) is loop.py, shared with GRPO. With LoRA the state holds the adapters
only and the frozen base is passed beside it (lora.partition); without, the base
argument is empty and the step is the full fine-tune it always was.
"""
from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from data_pipeline import grain_pipeline
from deepimagine_jax import grpo
from deepimagine_jax import lora
from deepimagine_jax import loop
from deepimagine_jax import sharding
from deepimagine_jax import train_state
from deepimagine_jax.config import SFTConfig
from deepimagine_jax.optimizer import make_optimizer
from deepimagine_jax.train_state import TrainState

BATCH_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")
ADAPTER_KEY = grain_pipeline.ADAPTER_KEY  # optional [B] or [B, T] int: a row's / token's adapter


def token_nll(logits_BTV, targets_BT):
  """-log p(target) per position, in float32."""
  return -grpo.logprobs_from_logits(logits_BTV, targets_BT)


def masked_nll_sum(params, graphdef, batch, frozen=None, rng=None):
  """Sum of completion-token NLL and the number of completion tokens.

  `frozen`: the base beside trainable adapters; `rng` turns on adapter dropout.
  """
  model = nnx.merge(graphdef, params, *([] if frozen is None else [frozen]))
  logits_BTV, _ = model(batch["inputs"], batch["positions"], segment_ids_BT=batch["segment_ids"],
                        adapter=batch[ADAPTER_KEY] if ADAPTER_KEY in batch else None,
                        dropout_rng=rng)
  nll_BT = token_nll(logits_BTV, batch["targets"])
  mask_BT = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum(jnp.where(mask_BT > 0, nll_BT, 0.0)), jnp.sum(mask_BT)


def train_step(state: TrainState, batch, frozen=None, *, graphdef, tx, accum_steps: int):
  """One optimizer update over a global batch split into `accum_steps` micro-batches.

  Gradients of the summed loss are accumulated and divided by the total number
  of completion tokens, so the update equals the one of a single big batch.
  `frozen` is the base when `state.params` are LoRA adapters; their dropout
  draws a key per step and micro-batch from `state.rng`.
  """
  micro = jax.tree.map(
      lambda x: x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:]), batch)
  grad_fn = jax.value_and_grad(masked_nll_sum, has_aux=True)
  step_rng = jax.random.fold_in(state.rng, state.step)

  def body(carry, mb_i):
    mb, i = mb_i
    g_acc, loss_acc, n_acc = carry
    (loss_sum, n), g = grad_fn(state.params, graphdef, mb, frozen,
                               jax.random.fold_in(step_rng, i))
    return (jax.tree.map(jnp.add, g_acc, g), loss_acc + loss_sum, n_acc + n), None

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (g_sum, loss_sum, n_tok), _ = jax.lax.scan(body, (zeros, 0.0, 0.0),
                                             (micro, jnp.arange(accum_steps)))
  denom = jnp.maximum(n_tok, 1.0)
  grads = jax.tree.map(lambda g: g / denom, g_sum)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss_sum / denom, "grad_norm": optax.global_norm(grads),
             "target_tokens": n_tok}
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def check_batch(global_batch_size: int, accum_steps: int, mesh):
  """The batch must split into micro-batches that split over the batch axes."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch_size % (accum_steps * shards):
    raise ValueError(
        f"global_batch_size {global_batch_size} must be a multiple of grad_accum_steps "
        f"({accum_steps}) x data*fsdp mesh size ({shards})")


def make_jitted_step(graphdef, tx, accum_steps: int, state_sh, batch_sh, frozen_sh=None):
  """The train step, jitted once for this run with shardings and state donation.

  The frozen base (an argument, `frozen_sh` its shardings) is never donated.
  """
  step = functools.partial(train_step, graphdef=graphdef, tx=tx, accum_steps=accum_steps)
  return jax.jit(step, in_shardings=(state_sh, batch_sh, frozen_sh),
                 out_shardings=(state_sh, None), donate_argnums=0)


def run_sft(cfg: SFTConfig, mesh, graphdef, params, batches: Iterator[dict], workdir: str, *,
            seed: int, stop_after: int | None = None, routed: bool = False):
  """Trains `params` for `cfg.loop.steps` updates; resumes model, optimizer and data position.

  `graphdef, params` are the model to train (train_state.init_params for a
  fresh one, or imported weights), already sharded on `mesh`; with adapters
  (lora.attach) only they train. `batches` is a checkpointable Grain iterator of
  host-local numpy batches (design.md "Token batches"). Returns the final
  TrainState, whose params are the trained part (lora.combine with the base).
  `routed`: the batches carry each token's adapter (ADAPTER_KEY, lora.route).
  """
  check_batch(cfg.global_batch_size, cfg.optimizer.grad_accum_steps, mesh)
  tx, schedule = make_optimizer(cfg.optimizer)
  lr_at = jax.jit(schedule)  # one call per step, not a dozen eager ops (~30 ms on a CPU host)
  trainable, frozen = lora.partition(params)
  state, state_sh = train_state.state_from_params(trainable, tx, mesh, seed)
  keys = BATCH_KEYS + ((ADAPTER_KEY,) if routed else ())
  batch_sh = {k: sharding.batch_sharding(mesh) for k in BATCH_KEYS}
  if routed:  # [B] (one example per row) or [B, T] (packed): the leading axis split alike
    batch_sh[ADAPTER_KEY] = sharding.batch_sharding(mesh, 1)
  frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
  jitted = make_jitted_step(graphdef, tx, cfg.optimizer.grad_accum_steps, state_sh, batch_sh,
                            frozen_sh)

  def step_fn(state, step, host_batch):
    del step
    tokens = float(np.sum(host_batch["segment_ids"] > 0)) * jax.process_count()
    batch = grain_pipeline.to_global_arrays({k: host_batch[k] for k in keys}, batch_sh)
    state, metrics = jitted(state, batch, frozen)
    return state, {**metrics, "tokens": tokens}

  def summarize(step, metrics, seconds):
    metrics["learning_rate"] = float(lr_at(step - 1))
    metrics["tokens_per_s"] = metrics.pop("tokens") / max(seconds, 1e-9)
    return metrics

  return loop.run(cfg.loop, workdir, mesh, state, batches, step_fn, summarize=summarize,
                  stop_after=stop_after)
