"""A Llama / Qwen style decoder in Flax NNX.

Shape letters, one meaning each across the project (tensor names end in them:
`x_BTD`; einsum strings use them too):
  B batch rows            T tokens of this call     S key slots (KV cache)    D d_model
  N query heads           K kv heads                R = N // K queries per kv head
  H head_dim              F mlp_dim                 V vocab
  Q distinct prompts (before their rows fan out to samples or options; B = Q * group)
  P prompt slots          C completion tokens       L = P + C buffer / cache slots
  O answer options        n heads of either kind (N or K)     h = H / 2 (RoPE pairs)
Every parameter carries `logical_axes` metadata; sharding.py maps those names to
mesh axes.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from deepimagine_jax import sharding
from deepimagine_jax.config import ModelConfig, RopeScaling

_NEG_INF = -1e30  # finite, so a row with nothing to attend to stays finite

KVCache = list  # one {"k": [B,S,K,H], "v": [B,S,K,H]} dict per layer


def _param(rngs: nnx.Rngs, shape, axes, dtype, fan_in: int) -> nnx.Param:
  init = jax.nn.initializers.normal(stddev=1.0 / math.sqrt(fan_in))
  return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, dtype, axis_name: str = "norm"):
    self.scale = nnx.Param(jnp.ones((dim,), dtype), logical_axes=(axis_name,))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(head_dim: int, base: float, scaling: RopeScaling | None) -> jax.Array:
  """Inverse frequencies, with Llama-3 wavelength-dependent scaling when given."""
  inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is None:
    return inv_freq
  low_wavelen = scaling.original_max_position / scaling.low_freq_factor
  high_wavelen = scaling.original_max_position / scaling.high_freq_factor
  wavelen = 2 * jnp.pi / inv_freq
  smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
  return jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor,
                   jnp.where(wavelen < high_wavelen, inv_freq, smoothed))


def apply_rope(x_BTnH, positions_BT, inv_freq_h):
  """Rotates pairs (i, i + H/2), the Hugging Face "rotate_half" layout."""
  angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq_h
  sin = jnp.sin(angles_BTh)[:, :, None, :]
  cos = jnp.cos(angles_BTh)[:, :, None, :]
  x = x_BTnH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTnH.dtype)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, N, K, H, w = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.weight_dtype
    self.cfg = cfg
    self.wq_DNH = _param(rngs, (D, N, H), ("embed", "q_heads", "head_dim"), w, D)
    self.wk_DKH = _param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), w, D)
    self.wv_DKH = _param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), w, D)
    self.wo_NHD = _param(rngs, (N, H, D), ("q_heads", "head_dim", "embed"), w, N * H)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(H, cfg.norm_eps, w, "head_dim")
      self.k_norm = RMSNorm(H, cfg.norm_eps, w, "head_dim")

  def __call__(self, x_BTD, positions_BT, mask_BTS, inv_freq, cache=None, cache_index=None):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, self.wq_DNH[...].astype(dt))
    k_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.wk_DKH[...].astype(dt))
    v_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.wv_DKH[...].astype(dt))
    if cfg.qk_norm:
      q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
    q_BTNH = apply_rope(q_BTNH, positions_BT, inv_freq)
    k_BTKH = apply_rope(k_BTKH, positions_BT, inv_freq)

    new_cache = None
    if cache is not None:
      idx = (0, cache_index, 0, 0)
      k_BSKH = jax.lax.dynamic_update_slice(cache["k"], k_BTKH.astype(cache["k"].dtype), idx)
      v_BSKH = jax.lax.dynamic_update_slice(cache["v"], v_BTKH.astype(cache["v"].dtype), idx)
      new_cache = {"k": k_BSKH, "v": v_BSKH}
      k_BSKH, v_BSKH = k_BSKH.astype(dt), v_BSKH.astype(dt)
    else:
      k_BSKH, v_BSKH = k_BTKH, v_BTKH

    B, T, N, H = q_BTNH.shape
    K = cfg.n_kv_heads
    q_BTKRH = q_BTNH.reshape(B, T, K, N // K, H)
    if T == 1:
      out_BTKRH = _decode_attention(q_BTKRH, k_BSKH, v_BSKH, mask_BTS, dt)
    else:
      logits_BKRTS = jnp.einsum("BTKRH,BSKH->BKRTS", q_BTKRH, k_BSKH,
                                preferred_element_type=jnp.float32) * (H ** -0.5)
      logits_BKRTS = jnp.where(mask_BTS[:, None, None], logits_BKRTS, _NEG_INF)
      probs_BKRTS = jax.nn.softmax(logits_BKRTS, axis=-1).astype(dt)
      out_BTKRH = jnp.einsum("BKRTS,BSKH->BTKRH", probs_BKRTS, v_BSKH)
    out_BTD = jnp.einsum("BTNH,NHD->BTD", out_BTKRH.reshape(B, T, N, H),
                         self.wo_NHD[...].astype(dt))
    return out_BTD, new_cache


def _decode_attention(q_B1KRH, k_BSKH, v_BSKH, mask_B1S, dt):
  """One query per row (decoding). The same maths as the einsum path, written as
  broadcast products in the cache's own [B, S, K, ...] layout: a batched matmul
  here would transpose the whole cache at every step (3-6x slower on CPU)."""
  H = q_B1KRH.shape[-1]
  logits_BSKR = jnp.sum(q_B1KRH[:, 0][:, None] * k_BSKH[:, :, :, None, :], axis=-1,
                        dtype=jnp.float32) * (H ** -0.5)
  logits_BSKR = jnp.where(mask_B1S[:, 0, :, None, None], logits_BSKR, _NEG_INF)
  probs_BSKR = jax.nn.softmax(logits_BSKR, axis=1).astype(dt)
  out_BKRH = jnp.sum(probs_BSKR[..., None] * v_BSKH[:, :, :, None, :], axis=1)
  return out_BKRH[:, None]


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, F, w = cfg.d_model, cfg.mlp_dim, cfg.weight_dtype
    self.dt = cfg.compute_dtype
    self.gate_DF = _param(rngs, (D, F), ("embed", "mlp"), w, D)
    self.up_DF = _param(rngs, (D, F), ("embed", "mlp"), w, D)
    self.down_FD = _param(rngs, (F, D), ("mlp", "embed"), w, F)

  def __call__(self, x_BTD):
    dt = self.dt
    gate_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, self.gate_DF[...].astype(dt))
    up_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, self.up_DF[...].astype(dt))
    return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate_BTF) * up_BTF, self.down_FD[...].astype(dt))


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.weight_dtype)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.weight_dtype)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x_BTD, positions_BT, mask_BTS, inv_freq, cache=None, cache_index=None):
    h_BTD, new_cache = self.attn(self.attn_norm(x_BTD), positions_BT, mask_BTS, inv_freq,
                                 cache, cache_index)
    x_BTD = sharding.constrain_activation(x_BTD + h_BTD)
    x_BTD = sharding.constrain_activation(x_BTD + self.mlp(self.mlp_norm(x_BTD)))
    return x_BTD, new_cache


def _block_forward(block, x_BTD, positions_BT, mask_BTS, inv_freq, cache, cache_index):
  return block(x_BTD, positions_BT, mask_BTS, inv_freq, cache, cache_index)


_remat_block_forward = nnx.remat(_block_forward)


def attention_mask(T: int, segment_ids_BT=None, *, cache_index=None, kv_valid_BS=None):
  """Boolean [B, T, S] mask: causal, within a segment, or over valid cache slots."""
  if kv_valid_BS is not None:
    S = kv_valid_BS.shape[1]
    q_slot_T = cache_index + jnp.arange(T)
    causal_TS = jnp.arange(S)[None, :] <= q_slot_T[:, None]
    return causal_TS[None] & kv_valid_BS[:, None, :].astype(bool)
  causal_TS = jnp.tril(jnp.ones((T, T), bool))
  if segment_ids_BT is None:
    return causal_TS[None]
  same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return causal_TS[None] & same_BTS & (segment_ids_BT[:, None, :] != 0)


class Transformer(nnx.Module):
  """Token ids in, float32 logits out; optional KV cache for decoding."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    # std 1/sqrt(D): with a tied head the initial logits then have unit scale.
    self.embed_VD = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                           cfg.weight_dtype, cfg.d_model)
    self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.weight_dtype)
    if not cfg.tie_embeddings:
      self.lm_head_DV = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                               cfg.weight_dtype, cfg.d_model)

  def __call__(self, tokens_BT, positions_BT, *, segment_ids_BT=None, cache: KVCache | None = None,
               cache_index=None, kv_valid_BS=None, return_hidden: bool = False):
    """Returns (logits_BTV, cache), or (hidden_BTD, cache) with `return_hidden`.

    Callers that need logits at a few positions only (the last prompt token,
    the completion) take the hidden states and call `logits` on a slice.
    """
    cfg, dt = self.cfg, self.cfg.compute_dtype
    T = tokens_BT.shape[1]
    if cache is not None and (cache_index is None or kv_valid_BS is None):
      raise ValueError("decoding with a cache needs cache_index and kv_valid_BS")
    if cache is None and kv_valid_BS is not None:
      raise ValueError("kv_valid_BS applies to cached decoding; pass segment_ids_BT instead")
    mask_BTS = attention_mask(T, segment_ids_BT, cache_index=cache_index,
                              kv_valid_BS=kv_valid_BS if cache is not None else None)
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_base, cfg.rope_scaling)
    x_BTD = sharding.constrain_activation(jnp.take(self.embed_VD[...], tokens_BT, axis=0).astype(dt))
    forward = _remat_block_forward if cfg.remat else _block_forward
    new_cache = [] if cache is not None else None
    for i, block in enumerate(self.layers):
      x_BTD, layer_cache = forward(block, x_BTD, positions_BT, mask_BTS, inv_freq,
                                   None if cache is None else cache[i], cache_index)
      if cache is not None:
        new_cache.append(layer_cache)
    x_BTD = self.final_norm(x_BTD)
    if return_hidden:
      return x_BTD, new_cache
    return self.logits(x_BTD), new_cache

  def logits(self, x_BTD):
    """float32 logits from final hidden states (after the final norm)."""
    dt = self.cfg.compute_dtype
    if self.cfg.tie_embeddings:
      return jnp.einsum("BTD,VD->BTV", x_BTD, self.embed_VD[...].astype(dt),
                        preferred_element_type=jnp.float32)
    return jnp.einsum("BTD,DV->BTV", x_BTD, self.lm_head_DV[...].astype(dt),
                      preferred_element_type=jnp.float32)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
  """A zeroed cache with `max_len` slots per sequence."""
  shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
          for _ in range(cfg.n_layers)]
