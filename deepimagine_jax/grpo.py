"""GRPO maths as small pure, jit-compatible functions (no model, no Python control
flow on traced values). Tested against plain NumPy in tests/test_grpo.py.

Layout: rewards and advantages are flat [N] with N = prompts * group_size, ordered
[prompt0 sample0..G-1, prompt1 sample0..G-1, ...]; token tensors are [B, T] with
B = N completions and mask_BT = 1 on completion tokens (the ones the policy chose).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = ("token", "sequence")
# How group-centred advantages are scaled. Both keep the relative weights of mixed
# rewards (one scalar for the whole batch); per-group std scaling does not (a group
# whose samples differ only by a 0.1 format bonus would get advantages of +-1, as
# large as a right-vs-wrong group), so it is not offered.
#   "none": r - group mean (Dr. GRPO); the step size follows the rewards' units.
#   "batch_std": (r - group mean) / std over the batch of those centred values, so
#     the step size does not depend on the rewards' units either (one log_prob
#     floor of -27.6 would otherwise set the scale of a whole run).
ADVANTAGE_SCALES = ("none", "batch_std")


def group_advantages(rewards_N, group_size: int, *, scale: str, eps: float = 1e-6):
  """Group-relative advantages r - group mean, scaled as `scale` says (ADVANTAGE_SCALES).

  The batch std is the population std (ddof=0) of the centred rewards of every
  sample in the batch. A group whose rewards are all equal (max == min, tested
  exactly rather than std == 0 so float rounding in the mean cannot leak a tiny
  advantage) carries no learning signal: its advantages are exactly 0 and it is
  counted. Returns (adv_N float32, zero_spread_groups int32 scalar).
  """
  if scale not in ADVANTAGE_SCALES:
    raise ValueError(f"advantage scale {scale!r} not in {ADVANTAGE_SCALES}")
  r_N = jnp.asarray(rewards_N, jnp.float32)
  if r_N.ndim != 1 or r_N.shape[0] % group_size:
    raise ValueError(f"rewards shape {r_N.shape} is not [prompts * group_size={group_size}]")
  r_PG = r_N.reshape(-1, group_size)
  zero_P1 = r_PG.max(axis=1, keepdims=True) == r_PG.min(axis=1, keepdims=True)
  adv_PG = jnp.where(zero_P1, 0.0, r_PG - r_PG.mean(axis=1, keepdims=True))
  if scale == "batch_std":
    adv_PG = adv_PG / (jnp.std(adv_PG) + eps)
  return adv_PG.reshape(-1), jnp.sum(zero_P1).astype(jnp.int32)


def masked_mean(x_BT, m_BT):
  """Mean over True entries; 0 when there are none. jnp.where keeps garbage out."""
  return jnp.sum(jnp.where(m_BT, x_BT, 0.0)) / jnp.maximum(jnp.sum(m_BT), 1)


def policy_loss(logp_new_BT, logp_old_BT, advantages_B, mask_BT, *, eps_low: float,
                eps_high: float, beta: float, logp_ref_BT=None,
                aggregation: str = "token"):
  """Clipped-surrogate GRPO loss with an optional k3 KL penalty to a reference.

  Per token: -min(r A, clip(r, 1-eps_low, 1+eps_high) A) + beta * k3, where
  r = exp(new - old) and k3 = exp(ref - new) - (ref - new) - 1 >= 0.
  aggregation (static): "token" sums over every completion token in the batch and
  divides by their count (DAPO); "sequence" averages each sequence's token mean,
  then averages over sequences that have at least one completion token (GRPO
  paper; all-padding rows, e.g. batch filler, do not dilute the mean).
  Masked tokens are replaced with 0 before any arithmetic, so garbage (even inf or
  NaN) there changes neither the loss nor its gradient.
  Returns (loss scalar, aux dict of scalar metrics over completion tokens).
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation {aggregation!r} not in {AGGREGATIONS}")
  m_BT = jnp.asarray(mask_BT) > 0
  new_BT = jnp.where(m_BT, jnp.asarray(logp_new_BT, jnp.float32), 0.0)
  old_BT = jnp.where(m_BT, jnp.asarray(logp_old_BT, jnp.float32), 0.0)
  adv_B1 = jnp.asarray(advantages_B, jnp.float32)[:, None]

  ratio_BT = jnp.exp(new_BT - old_BT)
  surr_BT = ratio_BT * adv_B1
  surr_clip_BT = jnp.clip(ratio_BT, 1.0 - eps_low, 1.0 + eps_high) * adv_B1
  loss_BT = -jnp.minimum(surr_BT, surr_clip_BT)
  # The clipped branch is active exactly where it is strictly smaller.
  clip_high_BT = m_BT & (adv_B1 > 0) & (ratio_BT > 1.0 + eps_high)
  clip_low_BT = m_BT & (adv_B1 < 0) & (ratio_BT < 1.0 - eps_low)

  use_kl = logp_ref_BT is not None and not (isinstance(beta, (int, float)) and beta == 0)
  if use_kl:
    ref_BT = jnp.where(m_BT, jnp.asarray(logp_ref_BT, jnp.float32), 0.0)
    d_BT = ref_BT - new_BT
    kl_BT = jnp.exp(d_BT) - d_BT - 1.0
    loss_BT = loss_BT + beta * kl_BT
    kl_mean = jnp.where(jnp.asarray(beta) == 0, 0.0, masked_mean(kl_BT, m_BT))
  else:
    kl_mean = jnp.zeros((), jnp.float32)

  if aggregation == "token":
    loss = masked_mean(loss_BT, m_BT)
  else:
    n_B = jnp.sum(m_BT, axis=1)
    seq_B = jnp.sum(jnp.where(m_BT, loss_BT, 0.0), axis=1) / jnp.maximum(n_B, 1)
    has_B = n_B > 0
    loss = jnp.sum(jnp.where(has_B, seq_B, 0.0)) / jnp.maximum(jnp.sum(has_B), 1)

  aux = {
      "clip_frac": masked_mean((clip_low_BT | clip_high_BT).astype(jnp.float32), m_BT),
      "clip_frac_low": masked_mean(clip_low_BT.astype(jnp.float32), m_BT),
      "clip_frac_high": masked_mean(clip_high_BT.astype(jnp.float32), m_BT),
      "ratio_mean": masked_mean(ratio_BT, m_BT),
      "kl_mean": kl_mean,
      "token_loss_mean": masked_mean(loss_BT, m_BT),
      "n_tokens": jnp.sum(m_BT).astype(jnp.float32),
  }
  return loss, aux


def logprobs_from_logits(logits_BTV, tokens_BT):
  """log softmax(logits)[token], in float32 whatever the logits' dtype."""
  logits_BTV = jnp.asarray(logits_BTV, jnp.float32)
  picked_BT = jnp.take_along_axis(logits_BTV, tokens_BT[..., None].astype(jnp.int32),
                                  axis=-1)[..., 0]
  return picked_BT - jax.nn.logsumexp(logits_BTV, axis=-1)


def token_entropy(logits_BTV, mask_BT):
  """Mean entropy (nats) of the next-token distribution over completion tokens."""
  logp_BTV = jax.nn.log_softmax(jnp.asarray(logits_BTV, jnp.float32), axis=-1)
  p_BTV = jnp.exp(logp_BTV)
  # where, not multiply: a -inf logit gives 0 * -inf = NaN.
  ent_BT = -jnp.sum(jnp.where(p_BTV > 0, p_BTV * logp_BTV, 0.0), axis=-1)
  return masked_mean(ent_BT, jnp.asarray(mask_BT) > 0)
