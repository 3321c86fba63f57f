"""On-device sampling: one prefill call, then a `lax.while_loop` over a KV cache.

The prompt arrives left-padded ([Q, P] tokens + mask). Buffers hold L = P + C
slots (C = max_new_tokens): slot s of the token buffer and of the KV cache is
the same sequence position, prompt first, generated tokens after. Positions are
`cumsum(mask) - 1`, so a left-padded row behaves like the bare prompt. The cache
is a model.SharedPrefixCache: the Q prompts' P slots once, read by all G rows of
a prompt, and the B rows' own C slots (a decode step is bound by reading the
cache, and a fanned-out prompt cache is read G times).

Jitted functions, all module level (compiled once per shape and setting):
`_prefill` builds the `SamplerState` and samples the first token; `_decode` takes
the state (donated: the returned state aliases it, so the cache is updated in
place) and loops one T=1 model call per token until every row is done or C
tokens exist; `_finish` slices out the completion. No host round trip per token,
and no random-number work per token: `_prefill` draws one uniform per (row,
completion token), and each token is the inverse CDF of its distribution at its
uniform (`draw_categorical`; tests/test_sampler.py checks the frequencies).

Log-probs: the log-prob of each sampled token under the distribution that drew
it, log_softmax of the truncated logits / T (top-k / top-p renormalised). Greedy
decoding (T = 0) draws from no distribution; it reports log_softmax(logits). GRPO
compares these with the trainer's log-probs of the full softmax(logits / T), so RL
refuses truncation and T = 0 (config.RLConfig).
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import PartitionSpec

from deepimagine_jax import model as model_lib
from deepimagine_jax import prefix
from deepimagine_jax import sharding


@struct.dataclass
class SamplerState:
  """The while_loop carry. C = max_new_tokens, L = P + C slots."""
  tokens_BL: jax.Array      # int32, prompt then generated (pad after a row stops)
  cache: model_lib.SharedPrefixCache  # the Q prompts' P slots, the B rows' C slots
  kv_valid_BL: jax.Array    # bool, slots the next query may attend to
  cur_index: jax.Array      # int32 scalar: slot of the last sampled token (fed next)
  positions_B: jax.Array    # int32 RoPE position of the token at cur_index
  done_B: jax.Array         # bool, row has emitted EOS
  logprobs_BC: jax.Array    # float32, 0 where completion_mask is 0
  mask_BC: jax.Array        # bool completion mask (EOS included)
  uniforms_BC: jax.Array    # float32 in [0, 1): completion token n is drawn at uniforms_BC[:, n]
  lengths_B: jax.Array      # int32 number of completion tokens (EOS included)
  adapter_B: jax.Array | None = None  # int32 each row's LoRA adapter; None: the active one


class SampleOutput(NamedTuple):
  tokens: jax.Array           # [B, C] int32, pad after EOS
  lengths: jax.Array          # [B] int32, EOS counted
  logprobs: jax.Array         # [B, C] float32 (see module docstring), 0 where masked
  completion_mask: jax.Array  # [B, C] float32 1/0
  sequences: jax.Array        # [B, P + C] int32 prompt (left-padded) + completion
  sequence_mask: jax.Array    # [B, P + C] float32: prompt mask then completion mask


# Sharding --------------------------------------------------------------------

def cache_spec(n_kv_heads: int, batch: int, mesh) -> PartitionSpec:
  """Batch over (data, fsdp), kv heads over tensor, each only where it divides."""
  n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
  batch_axes = sharding.BATCH_AXES if batch % n_batch == 0 else None
  heads_axis = "tensor" if n_kv_heads % mesh.shape["tensor"] == 0 else None
  return PartitionSpec(batch_axes, None, heads_axis, None)


def _active_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(sharding.MESH_AXES) <= set(mesh.axis_names):
    return None
  return mesh


def _constrain_cache(cache: model_lib.SharedPrefixCache) -> model_lib.SharedPrefixCache:
  mesh = _active_mesh()
  if mesh is None:
    return cache

  def constrain(part):
    k = part[0]["k"]
    spec = cache_spec(k.shape[2], k.shape[0], mesh)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, spec), part)

  return model_lib.SharedPrefixCache(constrain(cache.rows), constrain(cache.prefix))


# Token choice ----------------------------------------------------------------

def truncate_logits(logits_BV, top_k: int, top_p: float):
  """Sets logits outside the top-k and outside the top-p nucleus to -inf.

  top-k first, then top-p over what is left (the Hugging Face order). The
  most likely token always survives. Ties at a threshold are all kept.
  """
  if top_k > 0 and top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.flip(jnp.sort(logits_BV, axis=-1), axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass strictly above
    keep_BV = before_BV < top_p
    keep_BV = keep_BV.at[:, 0].set(True)
    thresh_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < thresh_B1, -jnp.inf, logits_BV)
  return logits_BV


def _last_positive(x_BW):
  """Index of the last entry > 0 in each row (0 if none)."""
  idx_W = jnp.arange(x_BW.shape[-1], dtype=jnp.int32)
  return jnp.max(jnp.where(x_BW > 0, idx_W, 0), axis=-1)


def draw_categorical(logits_BV, u_B):
  """One token per row from softmax(logits), the inverse CDF at u_B in [0, 1): (token, log-prob).

  Why not Gumbel-max (jax.random.categorical): that draws B x V random numbers and
  two logs per step, which cost more than the rest of a small model's decode step
  on CPU (a cheaper bit generator, rbg, was slower still there). This needs one
  uniform per row, and the sampler draws all of them before its loop. The CDF is
  walked in two levels (blocks of about sqrt(V) tokens, then inside the chosen
  block), so no length-V scan is needed. Float rounding between the two levels is
  clamped so that a zero-probability (truncated or underflowed) token is never
  chosen. The log-prob comes from the same exp and sum.
  """
  B, V = logits_BV.shape
  W = math.isqrt(V - 1) + 1  # tokens per block
  n_blocks = -(-V // W)
  max_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
  e_BV = jnp.exp(logits_BV - max_B1)  # 0 where truncated; the max gives 1, so total >= 1
  e_BnW = jnp.pad(e_BV, ((0, 0), (0, n_blocks * W - V))).reshape(B, n_blocks, W)
  block_Bn = jnp.sum(e_BnW, axis=-1)
  upto_Bn = jnp.cumsum(block_Bn, axis=-1)
  total_B = upto_Bn[:, -1]
  u_B = u_B.astype(jnp.float32) * total_B
  blk_B = jnp.minimum(jnp.sum(upto_Bn <= u_B[:, None], axis=-1), _last_positive(block_Bn))
  pick = lambda x_Bn: jnp.take_along_axis(x_Bn, blk_B[:, None], axis=1)[:, 0]
  rest_B = jnp.maximum(u_B - (pick(upto_Bn) - pick(block_Bn)), 0.0)  # >= 0: skips leading 0s
  e_BW = jnp.take_along_axis(e_BnW, blk_B[:, None, None], axis=1)[:, 0]
  j_B = jnp.minimum(jnp.sum(jnp.cumsum(e_BW, axis=-1) <= rest_B[:, None], axis=-1),
                    _last_positive(e_BW))
  tok_B = (blk_B * W + j_B).astype(jnp.int32)
  logit_B = jnp.take_along_axis(logits_BV, tok_B[:, None], axis=-1)[:, 0]
  return tok_B, logit_B - max_B1[:, 0] - jnp.log(total_B)


def choose_token(logits_BV, u_B, *, temperature: float, top_k: int, top_p: float):
  """(token [B] int32, its log-prob [B] float32) for one step; greedy at temperature 0.

  u_B: one uniform in [0, 1) per row (unused when greedy)."""
  logits_BV = logits_BV.astype(jnp.float32)
  if temperature == 0.0:
    tok_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV, axis=-1), tok_B[:, None],
                                 axis=-1)[:, 0]
    return tok_B, logp_B
  # The distribution the token is drawn from, and its log-prob under it.
  return draw_categorical(truncate_logits(logits_BV / temperature, top_k, top_p), u_B)


# The two jitted stages --------------------------------------------------------

_SAMPLING = ("temperature", "top_k", "top_p")


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "cache_dtype",
                                             "group_size") + _SAMPLING)
def _prefill(graphdef, params, prompt_QP, mask_QP, rng, eos_id, pad_id, adapter_Q, *,
             max_new_tokens, cache_dtype, group_size, temperature, top_k,
             top_p) -> SamplerState:
  """Runs each distinct prompt once, then fans it out to its G samples; samples token 0."""
  model = nnx.merge(graphdef, params)
  cfg = model.cfg
  Q, P = prompt_QP.shape
  B = Q * group_size
  C = max_new_tokens
  if P + C > cfg.max_seq_len:  # checked at trace time, where the config is known
    raise ValueError(f"prompt length {P} + max_new_tokens {C} = {P + C} exceeds "
                     f"max_seq_len {cfg.max_seq_len}")
  mask_QP = mask_QP.astype(bool)
  prompt_QP = prompt_QP.astype(jnp.int32)
  # The prompts' cache is not fanned out: the G rows of a prompt read its one copy.
  last_Q1D, prompt_cache, _ = prefix.prefill(model, prompt_QP, mask_QP, extra_slots=0,
                                             cache_dtype=jnp.dtype(cache_dtype),
                                             adapter_Q=adapter_Q)
  logits_QV = model.logits(last_Q1D)[:, 0]  # the head only where it is needed
  logits_BV, prompt_BP, mask_BP = prefix.fan_out((logits_QV, prompt_QP, mask_QP), group_size)
  kv_valid_BL = jnp.concatenate([mask_BP, jnp.zeros((B, C), bool)], axis=1)
  cache = _constrain_cache(model_lib.SharedPrefixCache(
      model_lib.init_cache(cfg, B, C, jnp.dtype(cache_dtype)), prompt_cache))
  # Every uniform of the run in one draw: no random-number work inside the decode loop.
  uniforms_BC = jax.random.uniform(rng, (B, C), jnp.float32)
  tok_B, logp_B = choose_token(logits_BV, uniforms_BC[:, 0], temperature=temperature,
                               top_k=top_k, top_p=top_p)
  tokens_BL = jnp.concatenate([prompt_BP, jnp.full((B, C), pad_id, jnp.int32)], axis=1)
  tokens_BL = tokens_BL.at[:, P].set(tok_B)
  return SamplerState(
      tokens_BL=sharding.constrain_activation(tokens_BL),
      cache=cache,
      kv_valid_BL=kv_valid_BL,
      cur_index=jnp.asarray(P, jnp.int32),
      positions_B=jnp.sum(mask_BP, axis=1).astype(jnp.int32),
      done_B=tok_B == eos_id,
      logprobs_BC=jnp.zeros((B, C), jnp.float32).at[:, 0].set(logp_B),
      mask_BC=jnp.zeros((B, C), bool).at[:, 0].set(True),
      uniforms_BC=uniforms_BC,
      lengths_B=jnp.ones((B,), jnp.int32),
      adapter_B=None if adapter_Q is None else prefix.fan_out(adapter_Q, group_size),
  )


@functools.partial(jax.jit, static_argnames=("graphdef",) + _SAMPLING,
                   donate_argnames=("state",))
def _decode(graphdef, params, state: SamplerState, eos_id, pad_id, *,
            temperature, top_k, top_p) -> SamplerState:
  """Feeds the last sampled token (T=1) until all rows are done or the buffer is full."""
  model = nnx.merge(graphdef, params)
  B, L = state.tokens_BL.shape
  P = L - state.mask_BC.shape[1]

  def cond(s: SamplerState):
    return (s.cur_index + 1 < L) & ~jnp.all(s.done_B)

  def body(s: SamplerState) -> SamplerState:
    slot = s.cur_index
    tok_B1 = jax.lax.dynamic_slice_in_dim(s.tokens_BL, slot, 1, axis=1)
    kv_valid_BL = jax.lax.dynamic_update_slice_in_dim(
        s.kv_valid_BL, jnp.ones((B, 1), bool), slot, axis=1)
    logits_B1V, cache = model(tok_B1, s.positions_B[:, None], cache=s.cache,
                              cache_index=slot, kv_valid_BS=kv_valid_BL, adapter=s.adapter_B)
    n = slot + 1 - P  # index of the new token in the completion arrays
    u_B = jax.lax.dynamic_index_in_dim(s.uniforms_BC, n, axis=1, keepdims=False)
    tok_B, logp_B = choose_token(logits_B1V[:, 0], u_B, temperature=temperature,
                                 top_k=top_k, top_p=top_p)
    live_B = ~s.done_B
    tok_B = jnp.where(live_B, tok_B, pad_id)
    logp_B = jnp.where(live_B, logp_B, 0.0)
    put = lambda buf, col, i: jax.lax.dynamic_update_slice_in_dim(buf, col[:, None], i, axis=1)
    return SamplerState(
        tokens_BL=put(s.tokens_BL, tok_B, slot + 1),
        cache=_constrain_cache(cache),
        kv_valid_BL=kv_valid_BL,
        cur_index=slot + 1,
        positions_B=s.positions_B + 1,
        done_B=s.done_B | (live_B & (tok_B == eos_id)),
        logprobs_BC=put(s.logprobs_BC, logp_B, n),
        mask_BC=put(s.mask_BC, live_B, n),
        uniforms_BC=s.uniforms_BC,
        lengths_B=s.lengths_B + live_B.astype(jnp.int32),
        adapter_B=s.adapter_B,
    )

  return jax.lax.while_loop(cond, body, state)


@jax.jit
def _finish(tokens_BL, mask_BC, logprobs_BC, lengths_B, prompt_mask_BP) -> SampleOutput:
  P = prompt_mask_BP.shape[1]
  completion_mask_BC = mask_BC.astype(jnp.float32)
  return SampleOutput(
      tokens=tokens_BL[:, P:],
      lengths=lengths_B,
      logprobs=logprobs_BC,
      completion_mask=completion_mask_BC,
      sequences=tokens_BL,
      sequence_mask=jnp.concatenate(
          [prompt_mask_BP.astype(jnp.float32), completion_mask_BC], axis=1),
  )


def sample(graphdef, params_state, prompt_tokens_QP, prompt_mask_QP, rng, *,
           max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           eos_id: int | None = None, pad_id: int = 0, cache_dtype: Any = "float32",
           group_size: int = 1, adapter_Q=None) -> SampleOutput:
  """Samples up to `max_new_tokens` per left-padded prompt, all on device.

  With `group_size` G, each of the Q prompts gets G samples (output row
  p*G + g): the prompt is prefilled once and its cache shared, as GRPO needs.

  `graphdef, params_state = nnx.split(model)`. temperature 0 is greedy; top_k 0
  and top_p 1.0 are off. A row stops after emitting `eos_id` (None: never);
  the EOS token is part of the completion (mask 1), later slots are `pad_id`
  with mask 0. Prompts are left-padded: the last column of a real row must be a
  real token. An all-padding row (batch filler) is allowed; its output is
  meaningless but finite and does not affect other rows. Call under
  `jax.set_mesh(mesh)` to shard the cache (batch on data+fsdp, kv heads on
  tensor). Compiles once per (shapes, graphdef, max_new_tokens, sampling
  settings, cache dtype). With no mesh set, it runs under the one the parameters live on
  (sharding.on_params_mesh). `adapter_Q` [Q] int: each prompt's LoRA adapter, used by
  its G samples (None: the model's active adapter).
  """
  if prompt_tokens_QP.ndim != 2 or prompt_tokens_QP.shape != prompt_mask_QP.shape:
    raise ValueError(f"prompt tokens {prompt_tokens_QP.shape} and mask "
                     f"{prompt_mask_QP.shape} must be the same [Q, P] shape")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
  sampling = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
  eos = jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32)
  pad = jnp.asarray(pad_id, jnp.int32)
  with sharding.on_params_mesh(params_state):
    state = _prefill(graphdef, params_state, prompt_tokens_QP, prompt_mask_QP, rng, eos, pad,
                     adapter_Q, max_new_tokens=int(max_new_tokens),
                     cache_dtype=jnp.dtype(cache_dtype).name, group_size=int(group_size),
                     **sampling)
    state = _decode(graphdef, params_state, state, eos, pad, **sampling)
    return _finish(state.tokens_BL, state.mask_BC, state.logprobs_BC, state.lengths_B,
                   prefix.fan_out(prompt_mask_QP, int(group_size)))

