"""The one shared-prefix forward: each prompt runs once, its KV cache serves G continuations.

Three callers need "a prompt, then several continuations of it": the sampler (G
samples per prompt), the GRPO trainer (the log-probs of those G completions,
gradients included) and evaluation (the log-likelihood of each answer option).
All of them prefill the Q distinct left-padded prompts once into a KV cache of
P + extra slots and fan the cache out to B = Q * G rows (row p*G + g continues
prompt p). Exact: the same numbers as running the B full sequences, at the cost
of Q prompt forwards instead of B.

Shape letters as in model.py's legend (Q distinct prompts, P prompt slots, T
continuation tokens, L = P + extra cache slots).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from deepimagine_jax import grpo
from deepimagine_jax import model as model_lib


def prompt_positions(mask_BP):
  """RoPE positions of a left-padded prompt: a padded row behaves like the bare prompt."""
  return jnp.maximum(jnp.cumsum(mask_BP.astype(jnp.int32), axis=1) - 1, 0).astype(jnp.int32)


def fan_out(tree, group_size: int):
  """Repeats every array's leading (batch) axis: row p becomes rows p*G .. p*G+G-1."""
  if group_size == 1:
    return tree
  return jax.tree.map(lambda x: jnp.repeat(x, group_size, axis=0), tree)


def prefill(model, prompt_QP, mask_QP, *, extra_slots: int, cache_dtype, adapter_Q=None):
  """Runs the prompts into a fresh cache of P + extra_slots slots.

  Returns (hidden state at the last prompt slot [Q, 1, D], cache, kv_valid
  [Q, L] bool: the prompt's real tokens, the extra slots not yet valid).
  The output head is left to the caller, which needs it at one position only.
  `adapter_Q` [Q]: each prompt's LoRA adapter (None: the model's active one).
  """
  Q, P = prompt_QP.shape
  mask_QP = mask_QP.astype(bool)
  kv_valid_QL = jnp.concatenate([mask_QP, jnp.zeros((Q, extra_slots), bool)], axis=1)
  cache = model_lib.init_cache(model.cfg, Q, P + extra_slots, cache_dtype)
  hidden_QPD, cache = model(prompt_QP.astype(jnp.int32), prompt_positions(mask_QP),
                             cache=cache, cache_index=0, kv_valid_BS=kv_valid_QL,
                             return_hidden=True, adapter=adapter_Q)
  return hidden_QPD[:, -1:], cache, kv_valid_QL


def continuation_hidden(model, prompt_QP, mask_QP, tokens_BT, *, group_size: int,
                        adapter_Q=None):
  """Hidden states that predict each continuation token: [B, T, D], B = Q * group_size.

  Position t holds the state after the prompt and tokens_BT[:, :t], so
  `model.logits` of it is the distribution of tokens_BT[:, t]. Tokens after a
  continuation's end (padding) only affect later positions (causal attention);
  callers mask those out. `adapter_Q` [Q]: each prompt's LoRA adapter, also its
  continuations' (None: the model's active one).
  """
  B, T = tokens_BT.shape
  P = prompt_QP.shape[1]
  last_Q1D, cache, _ = prefill(model, prompt_QP, mask_QP, extra_slots=T - 1,
                                cache_dtype=model.cfg.compute_dtype, adapter_Q=adapter_Q)
  hidden_B1D = fan_out(last_Q1D, group_size)
  if T == 1:
    return hidden_B1D
  mask_BP = fan_out(mask_QP.astype(bool), group_size)
  cache = fan_out(cache, group_size)
  positions_BT = jnp.sum(mask_BP, axis=1, keepdims=True).astype(jnp.int32) + jnp.arange(
      T - 1, dtype=jnp.int32)[None]
  kv_valid_BL = jnp.concatenate([mask_BP, jnp.ones((B, T - 1), bool)], axis=1)
  hidden_BTD, _ = model(tokens_BT[:, :-1], positions_BT, cache=cache, cache_index=P,
                        kv_valid_BS=kv_valid_BL, return_hidden=True,
                        adapter=None if adapter_Q is None else fan_out(adapter_Q, group_size))
  return jnp.concatenate([hidden_B1D, hidden_BTD], axis=1)


def continuation_logits(model, prompt_QP, mask_QP, tokens_BT, *, group_size: int,
                        temperature: float = 1.0, adapter_Q=None):
  """float32 logits / temperature that predict each continuation token, [B, T, V].

  The head runs on the T continuation positions only.
  """
  hidden_BTD = continuation_hidden(model, prompt_QP, mask_QP, tokens_BT,
                                   group_size=group_size, adapter_Q=adapter_Q)
  return model.logits(hidden_BTD).astype(jnp.float32) / max(temperature, 1e-6)


def continuation_logprobs(model, prompt_QP, mask_QP, tokens_BT, *, group_size: int,
                          temperature: float = 1.0, adapter_Q=None):
  """log p(token) of each continuation token under softmax(logits / temperature), [B, T]."""
  logits_BTV = continuation_logits(model, prompt_QP, mask_QP, tokens_BT,
                                   group_size=group_size, temperature=temperature,
                                   adapter_Q=adapter_Q)
  return grpo.logprobs_from_logits(logits_BTV, tokens_BT)
