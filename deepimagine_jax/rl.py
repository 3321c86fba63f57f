"""GRPO with on-device sampling and verifiable rewards.

One RL step: sample G completions per prompt on device (sampler.py), fetch the
tokens once to score them as text (the one host round trip; rewards are paid in
the class-balanced measure of the RL prompts, rewards.ClassBalance), compute
group advantages, optionally the frozen reference's log-probs, then
`updates_per_rollout` (GRPO's mu) jitted updates of the clipped surrogate
(grpo.py) against the sampling policy's log-probs (the sampler's, or recomputed
by the trainer's forward). The optimizer schedule counts updates, not steps
(config.RLConfig); the clipping, ratio and KL metrics are means over all updates.
The trainer's log-probs use the shared-prefix forward (prefix.py). The run around the step (resume with the prompt iterator's
position, metrics, NaN check, checkpoints) is loop.py, shared with SFT; the
reference is a handle (the checkpoint it was loaded from) recorded in every
checkpoint's metadata.
"""
from __future__ import annotations

import functools
import logging
import time
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
from deepimagine_jax import prefix
from deepimagine_jax import rewards as rewards_lib
from deepimagine_jax import sampler
from deepimagine_jax import sharding
from deepimagine_jax import train_state
from deepimagine_jax.config import RLConfig
from deepimagine_jax.optimizer import make_optimizer
from deepimagine_jax.train_state import TrainState

PROMPT_KEYS = ("prompt_tokens", "prompt_mask")
ADAPTER_KEY = grain_pipeline.ADAPTER_KEY  # [Q] each prompt's LoRA adapter (lora.route "factor")


def rl_update(state: TrainState, batch, frozen=None, *, graphdef, tx, cfg: RLConfig):
  """One optimizer update on a rollout batch (pure; jitted by GRPOTrainer).

  `frozen`: the base when `state.params` are LoRA adapters. No adapter dropout
  here: the forward is the sampler's (prefix.py), so the first update's ratio is 1.
  """

  def loss_fn(params):
    model = nnx.merge(graphdef, params, *([] if frozen is None else [frozen]))
    logits_BCV = prefix.continuation_logits(
        model, batch["prompt_tokens"], batch["prompt_mask"], batch["completions"],
        group_size=cfg.group_size, temperature=cfg.temperature,
        adapter_Q=batch.get(ADAPTER_KEY))
    logp_BC = grpo.logprobs_from_logits(logits_BCV, batch["completions"])
    mask_BC = batch["completion_mask"]
    loss, aux = grpo.policy_loss(
        logp_BC, batch["old_logprobs"], batch["advantages"], mask_BC,
        eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta,
        logp_ref_BT=batch["ref_logprobs"] if cfg.beta > 0 else None,
        aggregation=cfg.aggregation)
    aux = dict(aux)
    aux["entropy"] = grpo.token_entropy(logits_BCV, mask_BC)
    # At the first update the params are the sampling params: this is the
    # sampler-vs-trainer log-prob gap (numerics of the two code paths).
    aux["logprob_gap"] = grpo.masked_mean(jnp.abs(logp_BC - batch["old_logprobs"]), mask_BC > 0)
    return loss, aux

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  aux["loss"] = loss
  aux["grad_norm"] = optax.global_norm(grads)
  return state.replace(params=params, opt_state=opt_state), aux


def completion_logprobs(params, prompt_QP, prompt_mask_QP, completions_BC, adapter_Q=None, *,
                        graphdef, group_size: int, temperature: float):
  """Log-probs of the completions under `params` (the reference, or the old policy);
  `adapter_Q`: each prompt's adapter (None: the graphdef's active one, off for the reference)."""
  return prefix.continuation_logprobs(nnx.merge(graphdef, params), prompt_QP, prompt_mask_QP,
                                      completions_BC, group_size=group_size,
                                      temperature=temperature, adapter_Q=adapter_Q)


# Update metrics averaged over all `updates_per_rollout` updates of a step.
MEAN_OVER_UPDATES = ("loss", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean",
                     "kl_mean", "entropy", "grad_norm")


def update_metrics(auxes: list[dict]) -> dict[str, float]:
  """Means over the step's updates; `logprob_gap` from the first, where params = sampler's."""
  out = {k: float(np.mean([float(a[k]) for a in auxes])) for k in MEAN_OVER_UPDATES}
  out["kl"] = out.pop("kl_mean")
  out["logprob_gap"] = float(auxes[0]["logprob_gap"])
  return out


class GRPOTrainer:
  """The jitted pieces of one run (built once): rollout and update."""

  def __init__(self, graphdef, tx, cfg: RLConfig, mesh, state_sh, ref_params,
               balance: rewards_lib.ClassBalance, frozen=None, routed: bool = False):
    """`routed`: prompt batches carry each prompt's adapter (ADAPTER_KEY, lora.route), which
    samples, is scored and trains with it; the reference stays the base (adapters off)."""
    self.graphdef, self.cfg, self.balance = graphdef, cfg, balance
    # With LoRA the state holds the adapters; the base is an argument, never donated.
    self.frozen = nnx.State({}) if frozen is None else frozen
    rows = sharding.batch_sharding(mesh)
    self.prompt_keys = PROMPT_KEYS + ((ADAPTER_KEY,) if routed else ())
    self.prompt_sh = {k: rows for k in PROMPT_KEYS}
    self.batch_sh = {"prompt_tokens": rows, "prompt_mask": rows, "completions": rows,
                     "old_logprobs": rows, "advantages": sharding.batch_sharding(mesh, 1),
                     "completion_mask": rows, "ref_logprobs": rows}
    if routed:
      self.prompt_sh[ADAPTER_KEY] = self.batch_sh[ADAPTER_KEY] = sharding.batch_sharding(mesh, 1)
    update = jax.jit(
        functools.partial(rl_update, graphdef=graphdef, tx=tx, cfg=cfg),
        in_shardings=(state_sh, self.batch_sh, jax.tree.map(lambda x: x.sharding, self.frozen)),
        out_shardings=(state_sh, None), donate_argnums=0)
    self.update = lambda state, batch: update(state, batch, self.frozen)
    self.logprobs = jax.jit(functools.partial(
        completion_logprobs, graphdef=graphdef, group_size=cfg.group_size,
        temperature=cfg.temperature))
    # With LoRA the reference is the base with adapters off, run on the policy's own
    # arrays (no copy). Otherwise the policy state is donated at every update, so the
    # reference must own its buffers.
    lora_ref = ref_params is not None and bool(jax.tree.leaves(self.frozen))
    self.ref_params = None if ref_params is None or lora_ref else jax.tree.map(jnp.copy,
                                                                               ref_params)
    self.ref_logprobs = jax.jit(functools.partial(
        completion_logprobs, graphdef=lora.reference_graphdef(graphdef, ref_params)
        if lora_ref else graphdef, group_size=cfg.group_size, temperature=cfg.temperature))

  def rollout(self, params, prompt_batch, rng, tokenizer):
    """Samples, scores and builds the update batch. Returns (batch, host metrics, texts)."""
    cfg, G = self.cfg, self.cfg.group_size
    params = lora.combine(params, self.frozen)  # the one tree the sampler and prefix take
    prompts = grain_pipeline.to_global_arrays(
        {k: prompt_batch[k] for k in self.prompt_keys}, self.prompt_sh)
    prompt_QP, pmask_QP = prompts["prompt_tokens"], prompts["prompt_mask"]
    adapter_Q = prompts.get(ADAPTER_KEY)
    out = sampler.sample(self.graphdef, params, prompt_QP, pmask_QP, rng,
                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                         top_k=cfg.top_k, top_p=cfg.top_p, eos_id=tokenizer.eos_id,
                         pad_id=tokenizer.pad_id, cache_dtype=cfg.cache_dtype, group_size=G,
                         adapter_Q=adapter_Q)
    if cfg.beta > 0:  # dispatched before the host round trip below, so they overlap
      ref = self.ref_logprobs(params if self.ref_params is None else self.ref_params,
                              prompt_QP, pmask_QP, out.tokens)
    else:
      ref = jnp.zeros_like(out.logprobs)
    old = out.logprobs
    if cfg.recompute_old_logprobs:
      old = self.logprobs(params, prompt_QP, pmask_QP, out.tokens, adapter_Q)
    # the one round trip
    tokens_BC, lengths_B = sharding.host_array(out.tokens), sharding.host_array(out.lengths)
    texts = [tokenizer.decode([t for t in row[:n] if t != tokenizer.eos_id])
             for row, n in zip(tokens_BC.tolist(), lengths_B.tolist())]
    # Labels placed as global rows like the prompts, so that gathered they line up with
    # the completions (a mesh need not order its devices by process).
    answer_Q = grain_pipeline.to_global_arrays(
        {k: np.asarray(prompt_batch[k]) for k in ("labels", "n_options")},
        {k: self.batch_sh["advantages"] for k in ("labels", "n_options")})
    labels = np.repeat(sharding.host_array(answer_Q["labels"]), G).tolist()
    n_options = np.repeat(sharding.host_array(answer_Q["n_options"]), G).tolist()
    answers = rewards_lib.grade(texts, labels, n_options, self.balance)
    total, per_name = rewards_lib.combined_reward(answers, dict(cfg.reward_weights))
    advantages_B, zero_groups = grpo.group_advantages(jnp.asarray(total), G,
                                                      scale=cfg.advantage_scale)
    batch = {"prompt_tokens": prompt_QP, "prompt_mask": pmask_QP, "completions": out.tokens,
             "old_logprobs": old, "advantages": advantages_B,
             "completion_mask": out.completion_mask, "ref_logprobs": ref}
    if adapter_Q is not None:
      batch[ADAPTER_KEY] = adapter_Q
    batch = jax.device_put(batch, self.batch_sh)  # a no-op where the layout already matches
    host = {"reward_mean": float(np.mean(total)), "reward_std": float(np.std(total)),
            **{f"reward_{name}": float(np.mean(r)) for name, r in per_name.items()},
            "accuracy": float(np.mean(answers.right)),
            "format_failure_rate": float(1.0 - np.mean(answers.ok)),
            "tie_rate": float(np.mean(answers.ok & ~answers.answered)),
            "completion_length": float(np.mean(lengths_B)),
            "zero_spread_groups": float(zero_groups),
            "completion_tokens": float(np.sum(lengths_B))}
    return batch, host, texts

  def step(self, state: TrainState, step: int, prompt_batch, tokenizer):
    """One GRPO step: rollout, then `updates_per_rollout` updates; (state, metrics as floats)."""
    t0 = time.perf_counter()
    rng = jax.random.fold_in(state.rng, step)
    batch, host, _ = self.rollout(state.params, prompt_batch, rng, tokenizer)
    t_sample = time.perf_counter() - t0
    auxes = []
    for _ in range(self.cfg.updates_per_rollout):
      state, aux = self.update(state, batch)
      auxes.append(aux)
    state = state.replace(step=state.step + 1)
    metrics = {**host, **update_metrics(jax.device_get(auxes)), "s_sample_reward": t_sample,
               "s_update": time.perf_counter() - t0 - t_sample}
    return state, metrics


def check_prompts_per_step(prompts_per_step: int, mesh):
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if prompts_per_step % shards:
    raise ValueError(f"rl.prompts_per_step ({prompts_per_step}) must be a multiple of the "
                     f"data*fsdp mesh size ({shards})")


def run_grpo(cfg: RLConfig, mesh, graphdef, params, ref_params, prompts: Iterator[dict],
             tokenizer, workdir: str, *, seed: int, ref_handle: dict,
             balance: rewards_lib.ClassBalance, stop_after: int | None = None):
  """GRPO from `params` (e.g. the SFT warm start) with `ref_params` frozen (None: beta 0).

  With LoRA adapters in `params` only they train and the reference is the base
  with adapters off (`ref_params` then only says beta > 0). `balance` weighs the
  rewards by class (built from the labels of every RL prompt). Resumes policy,
  optimizer, rng and prompt position from `workdir/checkpoints`. Returns the
  final TrainState (its params: the trained part, lora.combine with the base).
  """
  check_prompts_per_step(cfg.prompts_per_step, mesh)
  tx, _ = make_optimizer(cfg.optimizer)
  trainable, frozen = lora.partition(params)  # with adapters, only they train
  state, state_sh = train_state.state_from_params(trainable, tx, mesh, seed)
  trainer = GRPOTrainer(graphdef, tx, cfg, mesh, state_sh, ref_params, balance, frozen,
                        routed=lora.routed_config(graphdef, params) is not None)

  def summarize(step, metrics, seconds):
    del step
    metrics["tokens_per_s"] = metrics["completion_tokens"] / max(seconds, 1e-9)
    return metrics

  state = loop.run(cfg.loop, workdir, mesh, state, prompts,
                   functools.partial(trainer.step, tokenizer=tokenizer), summarize=summarize,
                   meta={"reference": ref_handle}, stop_after=stop_after)
  logging.info("GRPO finished at step %d", int(state.step))
  return state
