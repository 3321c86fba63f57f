"""GRPO with on-device sampling and verifiable rewards.

One RL step: sample G completions per prompt on device (sampler.py), fetch the
tokens once to score them as text (the one host round trip), compute group
advantages, optionally the frozen reference's log-probs, then `mu` jitted
updates of the clipped surrogate (grpo.py) using the sampling-time log-probs as
the old policy. The state (policy, optimizer, step, rng) is checkpointed with
the prompt iterator's position; the reference is a handle (the checkpoint it
was loaded from) recorded in the checkpoint's metadata.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from deepimagine_jax import checkpoint as ckpt_lib
from deepimagine_jax import grpo
from deepimagine_jax import metrics_log
from deepimagine_jax import model as model_lib
from deepimagine_jax import rewards as rewards_lib
from deepimagine_jax import sampler
from deepimagine_jax import sharding
from deepimagine_jax import sft
from deepimagine_jax.optimizer import OptimizerConfig, make_optimizer


@dataclasses.dataclass(frozen=True)
class RLConfig:
  steps: int
  prompts_per_step: int  # B prompts; B * group_size sequences per step
  group_size: int = 4
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  eps_low: float = 0.2
  eps_high: float = 0.28
  beta: float = 0.04  # KL to the reference; 0 skips the reference forward
  aggregation: str = "token"  # "token" | "sequence"
  scale_by_std: bool = True
  mu: int = 1  # updates per rollout batch
  recompute_old_logprobs: bool = False
  reward_weights: tuple[tuple[str, float], ...] = (("correctness", 1.0), ("format", 0.1))
  cache_dtype: str = "float32"
  checkpoint_every: int = 50
  keep_checkpoints: int = 3
  log_every: int = 5
  resume: bool = True

  def __post_init__(self):
    if self.aggregation not in ("token", "sequence"):
      raise ValueError(f"rl.aggregation must be 'token' or 'sequence', got {self.aggregation!r}")
    for name, _ in self.reward_weights:
      rewards_lib.get_reward(name)  # unknown reward names fail at start-up


def completion_logprobs(params, graphdef, prompt_BpP, prompt_mask_BpP, completions_BN,
                        group_size: int, temperature: float):
  """Log-probs (at `temperature`) and entropies of the completion tokens, [B, N].

  Shared-prefix forward, exact and cheaper than running B = Bp * G full
  sequences: each distinct prompt runs once into a KV cache, the cache is
  repeated for its G completions, and the completions run against it (the
  cached decoding path with T = N - 1). Autodiff sums the G completions'
  gradients into the shared prompt. The head runs on completion positions only.
  """
  model = nnx.merge(graphdef, params)
  cfg = model.cfg
  Bp, P = prompt_BpP.shape
  B, N = completions_BN.shape
  pmask_BpP = prompt_mask_BpP.astype(bool)
  positions_BpP = jnp.maximum(jnp.cumsum(pmask_BpP, axis=1) - 1, 0)
  cache = model_lib.init_cache(cfg, Bp, P + N - 1, cfg.compute_dtype)
  kv_valid_BpL = jnp.concatenate([pmask_BpP, jnp.zeros((Bp, N - 1), bool)], axis=1)
  hidden_BpPD, cache = model(prompt_BpP, positions_BpP, cache=cache, cache_index=0,
                             kv_valid_BS=kv_valid_BpL, return_hidden=True)
  hidden_B1D = sampler.repeat_rows(hidden_BpPD[:, -1:], group_size)
  if N > 1:
    cache, pmask_BP = sampler.repeat_rows((cache, pmask_BpP), group_size)
    positions_BT = jnp.sum(pmask_BP, axis=1, keepdims=True) + jnp.arange(N - 1)[None]
    kv_valid_BL = jnp.concatenate([pmask_BP, jnp.ones((B, N - 1), bool)], axis=1)
    hidden_BTD, _ = model(completions_BN[:, :-1], positions_BT, cache=cache, cache_index=P,
                          kv_valid_BS=kv_valid_BL, return_hidden=True)
    hidden_B1D = jnp.concatenate([hidden_B1D, hidden_BTD], axis=1)
  logits_BNV = model.logits(hidden_B1D) / max(temperature, 1e-6)
  logp_BN = grpo.logprobs_from_logits(logits_BNV, completions_BN)
  logp_all = jax.nn.log_softmax(logits_BNV, axis=-1)
  entropy_BN = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  return logp_BN, entropy_BN


def rl_update(state: sft.TrainState, batch, *, graphdef, tx, cfg: RLConfig):
  """One optimizer update on a rollout batch (pure; jitted by `make_update`)."""

  def loss_fn(params):
    logp_BN, entropy_BN = completion_logprobs(params, graphdef, batch["prompt_tokens"],
                                              batch["prompt_mask"], batch["completions"],
                                              cfg.group_size, cfg.temperature)
    loss, aux = grpo.policy_loss(
        logp_BN, batch["old_logprobs"], batch["advantages"], batch["completion_mask"],
        eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta,
        logp_ref_BT=batch["ref_logprobs"] if cfg.beta > 0 else None,
        aggregation=cfg.aggregation)
    mask = batch["completion_mask"]
    n = jnp.maximum(jnp.sum(mask), 1.0)
    aux = dict(aux)
    aux["entropy"] = jnp.sum(jnp.where(mask > 0, entropy_BN, 0.0)) / n
    # At the first update the params are the sampling params: this is the
    # sampler-vs-trainer log-prob gap (numerics of the two code paths).
    aux["logprob_gap"] = jnp.sum(jnp.where(mask > 0, jnp.abs(logp_BN - batch["old_logprobs"]),
                                           0.0)) / n
    return loss, aux

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  aux["loss"] = loss
  aux["grad_norm"] = optax.global_norm(grads)
  return state.replace(params=params, opt_state=opt_state), aux


def _ref_logprobs(params, prompt_tokens, prompt_mask, completions, *, graphdef, group_size,
                  temperature):
  return completion_logprobs(params, graphdef, prompt_tokens, prompt_mask, completions,
                             group_size, temperature)[0]


class GRPOTrainer:
  """Holds the jitted pieces of one run (built once) and runs the loop."""

  def __init__(self, graphdef, tx, cfg: RLConfig, mesh, state_sh):
    self.graphdef, self.tx, self.cfg, self.mesh = graphdef, tx, cfg, mesh
    rows = sharding.batch_sharding(mesh)
    batch_sh = {"prompt_tokens": rows, "prompt_mask": rows, "completions": rows,
                "old_logprobs": rows, "advantages": sharding.batch_sharding(mesh, 1),
                "completion_mask": rows, "ref_logprobs": rows}
    self.update = jax.jit(
        functools.partial(rl_update, graphdef=graphdef, tx=tx, cfg=cfg),
        in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)
    self.ref_logprobs = jax.jit(functools.partial(
        _ref_logprobs, graphdef=graphdef, group_size=cfg.group_size,
        temperature=cfg.temperature))
    self.rows = rows
    self.batch_sh = batch_sh

  def rollout(self, params, prompt_batch, rng, tokenizer):
    """Samples, scores and builds the update batch. Returns (batch, host metrics)."""
    cfg, G = self.cfg, self.cfg.group_size
    rep = lambda x: np.repeat(np.asarray(x), G, axis=0)
    prompts = jax.device_put(np.asarray(prompt_batch["prompt_tokens"]), self.rows)
    pmask = jax.device_put(np.asarray(prompt_batch["prompt_mask"]), self.rows)
    out = sampler.sample(self.graphdef, params, prompts, pmask, rng,
                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                         top_k=cfg.top_k, top_p=cfg.top_p, eos_id=tokenizer.eos_id,
                         pad_id=tokenizer.pad_id, cache_dtype=cfg.cache_dtype, group_size=G)
    if cfg.beta > 0:  # dispatched before the host round trip below, so they overlap
      ref = self.ref_logprobs(self.ref_params, prompts, pmask, out.tokens)
    else:
      ref = jnp.zeros_like(out.logprobs)
    old = out.logprobs
    if cfg.recompute_old_logprobs:
      old = self.ref_logprobs(params, prompts, pmask, out.tokens)
    tokens, lengths = jax.device_get((out.tokens, out.lengths))  # the one round trip
    texts = [tokenizer.decode([t for t in row[:n] if t != tokenizer.eos_id])
             for row, n in zip(tokens.tolist(), lengths.tolist())]
    labels, n_opts = rep(prompt_batch["labels"]).tolist(), rep(prompt_batch["n_options"]).tolist()
    total, per_name, fmt_ok = rewards_lib.combined_reward(texts, labels, n_opts,
                                                          dict(cfg.reward_weights))
    adv, zero_groups = grpo.group_advantages(jnp.asarray(total), G,
                                             scale_by_std=cfg.scale_by_std)
    batch = {"prompt_tokens": prompts, "prompt_mask": pmask, "completions": out.tokens,
             "old_logprobs": old, "advantages": adv, "completion_mask": out.completion_mask,
             "ref_logprobs": ref}
    batch = jax.device_put(batch, self.batch_sh)  # a no-op where the layout already matches
    correct = rewards_lib.get_reward("correctness")(texts, labels, n_opts)
    host = {"reward_mean": float(np.mean(total)), "reward_std": float(np.std(total)),
            "accuracy": float(np.mean(correct)),
            "format_failure_rate": float(1.0 - np.mean(fmt_ok)),
            "completion_length": float(np.mean(lengths)),
            "zero_spread_groups": float(zero_groups),
            "completion_tokens": float(np.sum(lengths))}
    return batch, host, texts

  def run(self, state, prompts: Iterator[dict], tokenizer, workdir: str, ckpt, writer,
          *, stop_after: int | None = None, ref_handle: dict | None = None):
    cfg = self.cfg
    start = int(state.step)
    t_last = time.perf_counter()
    with jax.set_mesh(self.mesh):
      for step in range(start + 1, cfg.steps + 1):
        if stop_after is not None and step > stop_after:
          break
        t0 = time.perf_counter()
        rng = jax.random.fold_in(state.rng, step)
        batch, host, _ = self.rollout(state.params, next(prompts), rng, tokenizer)
        t_sample = time.perf_counter() - t0
        auxes = []
        for _ in range(cfg.mu):
          state, aux = self.update(state, batch)
          auxes.append(aux)
        state = state.replace(step=state.step + 1)
        aux = jax.device_get(auxes[0])  # gap/clip of the first update; loss of all
        loss = float(np.mean([float(a["loss"]) for a in jax.device_get(auxes)]))
        now = time.perf_counter()
        metrics = {**host, "loss": loss, "clip_frac": float(aux["clip_frac"]),
                   "kl": float(aux["kl_mean"]), "entropy": float(aux["entropy"]),
                   "logprob_gap": float(aux["logprob_gap"]), "grad_norm": float(aux["grad_norm"]),
                   "s_sample_reward": t_sample, "s_update": now - t0 - t_sample,
                   "tokens_per_s": host["completion_tokens"] / max(now - t_last, 1e-9)}
        t_last = now
        metrics_log.check_finite(step, metrics, keys=("loss", "grad_norm"))
        writer.write(step, metrics)
        if step % ckpt.save_every == 0 or step == cfg.steps:
          ckpt.save(step, state, data_state=prompts.get_state(),
                    meta={"reference": ref_handle or {}}, force=True)
    return state


def run_grpo(cfg: RLConfig, opt_cfg: OptimizerConfig, mesh, graphdef, init_params, ref_params,
             prompts: Iterator[dict], tokenizer, workdir: str, *, seed: int = 0,
             ref_handle: dict | None = None, stop_after: int | None = None):
  """GRPO from `init_params` (e.g. the SFT warm start) with `ref_params` frozen.

  Resumes policy, optimizer, rng and prompt position from `workdir/checkpoints`.
  Returns the final TrainState.
  """
  if cfg.prompts_per_step % (mesh.shape["data"] * mesh.shape["fsdp"]):
    raise ValueError(f"prompts_per_step ({cfg.prompts_per_step}) must be a multiple of the "
                     f"data*fsdp mesh size ({mesh.shape['data'] * mesh.shape['fsdp']})")
  tx, _ = make_optimizer(opt_cfg)
  state, state_sh = sft._state_from_params(init_params, tx, mesh, seed)
  ckpt = ckpt_lib.Checkpointer(f"{workdir}/checkpoints", max_to_keep=cfg.keep_checkpoints,
                               save_every=cfg.checkpoint_every)
  state, data_state = sft.restore_or_init(ckpt, state, state_sh, cfg.resume)
  if data_state is not None:
    prompts.set_state(data_state)
  trainer = GRPOTrainer(graphdef, tx, cfg, mesh, state_sh)
  # The policy state is donated at every update; the reference must own its buffers.
  trainer.ref_params = None if ref_params is None else jax.tree.map(jnp.copy, ref_params)
  writer = metrics_log.MetricsWriter(workdir, cfg.steps, start_step=int(state.step) + 1,
                                     log_every=cfg.log_every)
  try:
    state = trainer.run(state, prompts, tokenizer, workdir, ckpt, writer,
                        stop_after=stop_after, ref_handle=ref_handle)
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
  logging.info("GRPO finished at step %d", int(state.step))
  return state
