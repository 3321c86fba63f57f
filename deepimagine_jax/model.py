"""One decoder in Flax NNX for the Llama, Qwen3 and Gemma 3 families.

Gemma 3 is the same block with switches from ModelConfig: GeGLU, RMSNorm by
(1 + w), norms on the attention and MLP outputs too, embeddings times
sqrt(D), its own query scale, and local layers that see a sliding window of
keys with their own RoPE base (the mask and the base are picked per layer).

Two layouts of the layers (`cfg.scan_layers`): a list of blocks run in an
unrolled loop, or one block whose parameters carry a leading layer axis (Y), run
by `lax.scan` so compile time stays flat in depth. Both compute the same function
from the same seed; the per-layer differences (local or global mask, RoPE
frequencies) enter the scan as per-layer arrays.

Shape letters, one meaning each across the project (tensor names end in them:
`x_BTD`; einsum strings use them too):
  B batch rows            T tokens of this call     S key slots (KV cache)    D d_model
  N query heads           K kv heads                R = N // K queries per kv head
  H head_dim              F mlp_dim                 V vocab
  Q distinct prompts (before their rows fan out to samples or options; B = Q * group)
  P prompt slots          C completion tokens       L = P + C buffer / cache slots
  O answer options        n heads of either kind (N or K)     h = H / 2 (RoPE pairs)
  E named LoRA adapters   r LoRA rank        Y layers (a stacked, scanned layout)
Every parameter carries `logical_axes` metadata; sharding.py maps those names to
mesh axes. With a LoRAConfig of rank > 0 every targeted projection also holds a
lora.Adapter (its own Variable type, so the base's nnx.Param stay frozen apart).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from deepimagine_jax import lora as lora_lib
from deepimagine_jax import sharding
from deepimagine_jax.config import LoRAConfig, ModelConfig, RopeScaling

_NEG_INF = -1e30  # finite, so a row with nothing to attend to stays finite


@struct.dataclass
class StackedCache:
  """The scanned layout's KV cache: every layer's keys and values in one array each.

  The layer axis sits after the kv heads, so axis 0 is the batch and axis 2 the
  kv heads in both layouts: fanning rows out (prefix.fan_out) and the sampler's
  cache sharding apply unchanged. `cache[i]` is layer i's {"k", "v"} [B, S, K, H],
  as in the unrolled layout's list.
  """
  k_BSKYH: jax.Array
  v_BSKYH: jax.Array

  def __getitem__(self, layer):
    return {"k": self.k_BSKYH[:, :, :, layer], "v": self.v_BSKYH[:, :, :, layer]}

  def __len__(self):
    return self.k_BSKYH.shape[3]


# Unrolled: one {"k": [B,S,K,H], "v": [B,S,K,H]} dict per layer; scanned: StackedCache.
KVCache = list | StackedCache


@struct.dataclass
class SharedPrefixCache:
  """A decoding cache whose first P slots are Q prompts' keys and values, each shared
  by its G = B / Q rows (row p*G + g continues prompt p), and whose other C slots are
  the rows' own. A decode step is bound by reading the cache: this way each prompt's
  keys are read once per step, not G times (prefix.py fans out no copies). Slots and
  `cache_index` count from the prompt's first slot, as in one [B, P + C] cache.
  """
  rows: KVCache    # B rows, C slots
  prefix: KVCache  # Q prompts, P slots


class _SharedLayer(NamedTuple):
  """One layer's view of a SharedPrefixCache: each part a dict or (StackedCache, layer)."""
  rows: Any
  prefix: Any


def _param(rngs: nnx.Rngs, shape, axes, dtype, fan_in: int) -> nnx.Param:
  init = jax.nn.initializers.normal(stddev=1.0 / math.sqrt(fan_in))
  return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


# The logical axis of each shape letter a projection's input or output has.
_AXES = {"D": "embed", "N": "q_heads", "K": "kv_heads", "H": "head_dim", "F": "mlp"}


def _adapters(cfg: ModelConfig, lora: LoRAConfig | None, specs: dict, rngs: nnx.Rngs):
  """{target: lora.Adapter} for this module's targeted projections; None without LoRA.

  `specs`: target -> (input letters, output letters, name of the base weight).
  """
  if lora is None or not lora.enabled:
    return None
  sizes = {"D": cfg.d_model, "N": cfg.n_heads, "K": cfg.n_kv_heads, "H": cfg.head_dim,
           "F": cfg.mlp_dim}
  return nnx.Dict({t: lora_lib.Adapter(lora, ins, outs, weight, sizes, _AXES, rngs)
                   for t, (ins, outs, weight) in specs.items() if t in lora.targets})


def _project(module, target: str, spec: str, x, w, adapter, rng):
  """x times the base weight w (einsum `spec`), plus the target's adapter update when on."""
  y = jnp.einsum(spec, x, w)
  if adapter is None or module.lora is None or target not in module.lora:
    return y
  return y + module.lora[target](x, adapter, rng)


class RMSNorm(nnx.Module):
  """Scales by w, or by (1 + w) with w starting at 0 (Gemma); float32 inside."""

  def __init__(self, dim: int, cfg: ModelConfig, axis_name: str = "norm"):
    init = jnp.zeros if cfg.norm_unit_offset else jnp.ones
    self.scale = nnx.Param(init((dim,), cfg.weight_dtype), logical_axes=(axis_name,))
    self.eps = cfg.norm_eps
    self.unit_offset = cfg.norm_unit_offset

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    return (y * (1.0 + scale if self.unit_offset else scale)).astype(x.dtype)


def rope_inv_freq(head_dim: int, base: float, scaling: RopeScaling | None) -> jax.Array:
  """Inverse frequencies, with linear or Llama-3 wavelength-dependent scaling when given."""
  inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is None:
    return inv_freq
  if scaling.rope_type == "linear":
    return inv_freq / scaling.factor
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

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
    D, N, K, H, w = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.weight_dtype
    self.cfg = cfg
    self.wq_DNH = _param(rngs, (D, N, H), ("embed", "q_heads", "head_dim"), w, D)
    self.wk_DKH = _param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), w, D)
    self.wv_DKH = _param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), w, D)
    self.wo_NHD = _param(rngs, (N, H, D), ("q_heads", "head_dim", "embed"), w, N * H)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(H, cfg, "head_dim")
      self.k_norm = RMSNorm(H, cfg, "head_dim")
    self.lora = _adapters(cfg, lora, {"q": ("D", "NH", "wq_DNH"), "k": ("D", "KH", "wk_DKH"),
                                      "v": ("D", "KH", "wv_DKH"), "o": ("NH", "D", "wo_NHD")},
                          rngs)

  def __call__(self, x_BTD, positions_BT, mask_BTS, inv_freq, cache=None, cache_index=None,
               adapter=None, rng=None):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    q_BTNH = _project(self, "q", "BTD,DNH->BTNH", x_BTD, self.wq_DNH[...].astype(dt), adapter, rng)
    k_BTKH = _project(self, "k", "BTD,DKH->BTKH", x_BTD, self.wk_DKH[...].astype(dt), adapter, rng)
    v_BTKH = _project(self, "v", "BTD,DKH->BTKH", x_BTD, self.wv_DKH[...].astype(dt), adapter, rng)
    if cfg.qk_norm:
      q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
    q_BTNH = apply_rope(q_BTNH, positions_BT, inv_freq)
    k_BTKH = apply_rope(k_BTKH, positions_BT, inv_freq)

    B, T, N, H = q_BTNH.shape
    K = cfg.n_kv_heads
    q_BTKRH = q_BTNH.reshape(B, T, K, N // K, H)
    new_cache = None
    if isinstance(cache, _SharedLayer):  # decoding over the prompts' shared slots and the rows'
      pk_QPKH, pv_QPKH = (x.astype(dt) for x in _layer_kv(cache.prefix))
      P = pk_QPKH.shape[1]
      new_cache, k_BCKH, v_BCKH = _write_cache(cache.rows, k_BTKH, v_BTKH, cache_index - P)
      out_BTKRH = _shared_decode_attention(q_BTKRH, pk_QPKH, pv_QPKH, k_BCKH.astype(dt),
                                           v_BCKH.astype(dt), mask_BTS, cfg.query_scale, dt)
    else:
      if cache is not None:
        new_cache, k_BSKH, v_BSKH = _write_cache(cache, k_BTKH, v_BTKH, cache_index)
        k_BSKH, v_BSKH = k_BSKH.astype(dt), v_BSKH.astype(dt)
      else:
        k_BSKH, v_BSKH = k_BTKH, v_BTKH
      if T == 1:
        out_BTKRH = _decode_attention(q_BTKRH, k_BSKH, v_BSKH, mask_BTS, cfg.query_scale, dt)
      else:
        logits_BKRTS = jnp.einsum("BTKRH,BSKH->BKRTS", q_BTKRH, k_BSKH,
                                  preferred_element_type=jnp.float32) * cfg.query_scale
        logits_BKRTS = jnp.where(mask_BTS[:, None, None], logits_BKRTS, _NEG_INF)
        probs_BKRTS = jax.nn.softmax(logits_BKRTS, axis=-1).astype(dt)
        out_BTKRH = jnp.einsum("BKRTS,BSKH->BTKRH", probs_BKRTS, v_BSKH)
    out_BTD = _project(self, "o", "BTNH,NHD->BTD", out_BTKRH.reshape(B, T, N, H),
                       self.wo_NHD[...].astype(dt), adapter, rng)
    return out_BTD, new_cache


def _write_cache(cache, k_BTKH, v_BTKH, cache_index):
  """Writes this call's keys and values from slot `cache_index`.

  `cache` is a layer's {"k", "v"} (unrolled) or (StackedCache, layer) inside the
  scan, where only the new slots are written into the stack (the scan carries it,
  so XLA updates it in place). Returns (new cache, this layer's k and v [B, S, K, H]).
  """
  if isinstance(cache, dict):
    idx = (0, cache_index, 0, 0)
    k_BSKH = jax.lax.dynamic_update_slice(cache["k"], k_BTKH.astype(cache["k"].dtype), idx)
    v_BSKH = jax.lax.dynamic_update_slice(cache["v"], v_BTKH.astype(cache["v"].dtype), idx)
    return {"k": k_BSKH, "v": v_BSKH}, k_BSKH, v_BSKH
  stack, layer = cache
  idx = (0, cache_index, 0, layer, 0)
  k_BSKYH = jax.lax.dynamic_update_slice(
      stack.k_BSKYH, k_BTKH[:, :, :, None].astype(stack.k_BSKYH.dtype), idx)
  v_BSKYH = jax.lax.dynamic_update_slice(
      stack.v_BSKYH, v_BTKH[:, :, :, None].astype(stack.v_BSKYH.dtype), idx)
  new_stack = StackedCache(k_BSKYH, v_BSKYH)
  return (new_stack, *_layer_kv((new_stack, layer)))


def _layer_kv(cache):
  """(k, v) [B, S, K, H] of one layer: a dict, or (StackedCache, layer) inside the scan."""
  if isinstance(cache, dict):
    return cache["k"], cache["v"]
  stack, layer = cache
  return (jax.lax.dynamic_index_in_dim(stack.k_BSKYH, layer, axis=3, keepdims=False),
          jax.lax.dynamic_index_in_dim(stack.v_BSKYH, layer, axis=3, keepdims=False))


def _shared_decode_attention(q_B1KRH, pk_QPKH, pv_QPKH, k_BCKH, v_BCKH, mask_B1S, scale: float,
                             dt):
  """_decode_attention over a SharedPrefixCache: the P prompt slots are scored once per
  prompt for all its G rows' queries (M = G x R of them per kv head), the C row slots
  per row, and one softmax runs over both. The same function as _decode_attention on
  the fanned-out [B, P + C] cache, up to float rounding."""
  B, _, K, R, H = q_B1KRH.shape
  Q, P = pk_QPKH.shape[:2]
  G = B // Q
  to_QKGR = lambda x_BKR: x_BKR.reshape(Q, G, K, R).transpose(0, 2, 1, 3)
  to_BKR = lambda x_QKGR: x_QKGR.transpose(0, 2, 1, 3).reshape(B, K, R)
  q_BKRH = q_B1KRH[:, 0]
  q_QKGRH = q_BKRH.reshape(Q, G, K, R, H).transpose(0, 2, 1, 3, 4)
  pre_QPKGR = jnp.sum(q_QKGRH[:, None] * pk_QPKH[:, :, :, None, None, :], axis=-1,
                      dtype=jnp.float32) * scale
  pre_mask_QPG = jnp.swapaxes(mask_B1S[:, 0, :P].reshape(Q, G, P), 1, 2)
  pre_QPKGR = jnp.where(pre_mask_QPG[:, :, None, :, None], pre_QPKGR, _NEG_INF)
  rows_BCKR = jnp.sum(q_BKRH[:, None] * k_BCKH[:, :, :, None, :], axis=-1,
                      dtype=jnp.float32) * scale
  rows_BCKR = jnp.where(mask_B1S[:, 0, P:, None, None], rows_BCKR, _NEG_INF)
  max_QKGR = jnp.maximum(jnp.max(pre_QPKGR, axis=1), to_QKGR(jnp.max(rows_BCKR, axis=1)))
  e_pre_QPKGR = jnp.exp(pre_QPKGR - max_QKGR[:, None])
  e_rows_BCKR = jnp.exp(rows_BCKR - to_BKR(max_QKGR)[:, None])
  total_QKGR = jnp.sum(e_pre_QPKGR, axis=1) + to_QKGR(jnp.sum(e_rows_BCKR, axis=1))
  p_pre_QPKGR = (e_pre_QPKGR / total_QKGR[:, None]).astype(dt)
  p_rows_BCKR = (e_rows_BCKR / to_BKR(total_QKGR)[:, None]).astype(dt)
  pre_QKGRH = jnp.sum(p_pre_QPKGR[..., None] * pv_QPKH[:, :, :, None, None, :], axis=1)
  out_BKRH = pre_QKGRH.transpose(0, 2, 1, 3, 4).reshape(B, K, R, H) + jnp.sum(
      p_rows_BCKR[..., None] * v_BCKH[:, :, :, None, :], axis=1)
  return out_BKRH[:, None]


def _decode_attention(q_B1KRH, k_BSKH, v_BSKH, mask_B1S, scale: float, dt):
  """One query per row (decoding). The same maths as the einsum path, written as
  broadcast products in the cache's own [B, S, K, ...] layout: a batched matmul
  here would transpose the whole cache at every step (3-6x slower on CPU)."""
  logits_BSKR = jnp.sum(q_B1KRH[:, 0][:, None] * k_BSKH[:, :, :, None, :], axis=-1,
                        dtype=jnp.float32) * scale
  logits_BSKR = jnp.where(mask_B1S[:, 0, :, None, None], logits_BSKR, _NEG_INF)
  probs_BSKR = jax.nn.softmax(logits_BSKR, axis=1).astype(dt)
  out_BKRH = jnp.sum(probs_BSKR[..., None] * v_BSKH[:, :, :, None, :], axis=1)
  return out_BKRH[:, None]


class MLP(nnx.Module):
  """SwiGLU, down(silu(gate(x)) * up(x)), or GeGLU with tanh-approximate GELU (Gemma)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
    D, F, w = cfg.d_model, cfg.mlp_dim, cfg.weight_dtype
    self.dt = cfg.compute_dtype
    self.gelu = cfg.mlp_activation == "gelu_tanh"
    self.gate_DF = _param(rngs, (D, F), ("embed", "mlp"), w, D)
    self.up_DF = _param(rngs, (D, F), ("embed", "mlp"), w, D)
    self.down_FD = _param(rngs, (F, D), ("mlp", "embed"), w, F)
    self.lora = _adapters(cfg, lora, {"gate": ("D", "F", "gate_DF"), "up": ("D", "F", "up_DF"),
                                      "down": ("F", "D", "down_FD")}, rngs)

  def __call__(self, x_BTD, adapter=None, rng=None):
    dt = self.dt
    gate_BTF = _project(self, "gate", "BTD,DF->BTF", x_BTD, self.gate_DF[...].astype(dt),
                        adapter, rng)
    up_BTF = _project(self, "up", "BTD,DF->BTF", x_BTD, self.up_DF[...].astype(dt), adapter, rng)
    act_BTF = jax.nn.gelu(gate_BTF, approximate=True) if self.gelu else jax.nn.silu(gate_BTF)
    return _project(self, "down", "BTF,FD->BTD", act_BTF * up_BTF, self.down_FD[...].astype(dt),
                    adapter, rng)


class Block(nnx.Module):
  """Pre-norm residual block; with `post_norms` the sublayer outputs are normed too (Gemma)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
    self.attn_norm = RMSNorm(cfg.d_model, cfg)
    self.attn = Attention(cfg, rngs, lora)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg)
    self.mlp = MLP(cfg, rngs, lora)
    self.post_norms = cfg.post_norms
    if cfg.post_norms:
      self.post_attn_norm = RMSNorm(cfg.d_model, cfg)
      self.post_mlp_norm = RMSNorm(cfg.d_model, cfg)

  def __call__(self, x_BTD, positions_BT, mask_BTS, inv_freq, cache=None, cache_index=None,
               adapter=None, rng=None):
    h_BTD, new_cache = self.attn(self.attn_norm(x_BTD), positions_BT, mask_BTS, inv_freq,
                                 cache, cache_index, adapter, rng)
    if self.post_norms:
      h_BTD = self.post_attn_norm(h_BTD)
    x_BTD = sharding.constrain_activation(x_BTD + h_BTD)
    h_BTD = self.mlp(self.mlp_norm(x_BTD), adapter, rng)
    if self.post_norms:
      h_BTD = self.post_mlp_norm(h_BTD)
    x_BTD = sharding.constrain_activation(x_BTD + h_BTD)
    return x_BTD, new_cache


def _block_forward(block, x_BTD, positions_BT, mask_BTS, inv_freq, cache, cache_index, adapter,
                   rng):
  return block(x_BTD, positions_BT, mask_BTS, inv_freq, cache, cache_index, adapter, rng)


def _remat_block_forward(block, *args):
  """_block_forward under jax.checkpoint, on the block's state as a pure argument (nnx.remat
  refuses a block whose frozen base and trained adapters come from different traces)."""
  graphdef, state = nnx.split(block)
  return jax.checkpoint(lambda state, *a: _block_forward(nnx.merge(graphdef, state), *a))(
      state, *args)


def _stack_blocks(blocks: list[Block]) -> Block:
  """One Block whose parameters are those of `blocks` on a leading layer axis ("layers").

  The blocks are made one by one, as the unrolled layout makes them, so a seed
  gives the same weights in both layouts.
  """
  graphdef, state = nnx.split(blocks[0])

  def stack(*vs):
    axes = vs[0].get_metadata()["logical_axes"]
    return vs[0].replace(jnp.stack([v[...] for v in vs]), logical_axes=("layers", *axes))

  state = jax.tree.map(stack, state, *(nnx.split(b)[1] for b in blocks[1:]),
                       is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state)


def attention_mask(T: int, segment_ids_BT=None, *, cache_index=None, kv_valid_BS=None,
                   window: int = 0):
  """Boolean [B, T, S] mask: causal, within a segment, or over valid cache slots.

  With `window` > 0, a query also sees only the `window` slots ending at its own
  (a local layer). Slots, not RoPE positions, as in transformers: the two differ
  only by left padding, which sits before every real token, so the distance
  between two real tokens is the same in both.
  """
  if kv_valid_BS is not None:
    S = kv_valid_BS.shape[1]
    q_slot_T = cache_index + jnp.arange(T)
    valid_BS = kv_valid_BS.astype(bool)
  else:
    S, q_slot_T, valid_BS = T, jnp.arange(T), None
  behind_TS = q_slot_T[:, None] - jnp.arange(S)[None, :]  # how far each key is behind
  keep_TS = behind_TS >= 0
  if window > 0:
    keep_TS &= behind_TS < window
  if valid_BS is not None:
    return keep_TS[None] & valid_BS[:, None, :]
  if segment_ids_BT is None:
    return keep_TS[None]
  same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return keep_TS[None] & same_BTS & (segment_ids_BT[:, None, :] != 0)


class Transformer(nnx.Module):
  """Token ids in, float32 logits out; optional KV cache for decoding.

  With `lora` of rank > 0 the projections carry adapters; `active_adapter` (static:
  part of the graphdef, see lora.py) is the one a call without `adapter` uses,
  -1 for none (the base alone: GRPO's reference).
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
    self.cfg = cfg
    self.lora_cfg = lora if lora is not None and lora.enabled else None
    self.active_adapter = 0 if self.lora_cfg is not None else -1
    # std 1/sqrt(D): with a tied head the initial logits then have unit scale.
    self.embed_VD = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                           cfg.weight_dtype, cfg.d_model)
    blocks = [Block(cfg, rngs, self.lora_cfg) for _ in range(cfg.n_layers)]
    self.layers = _stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
    self.final_norm = RMSNorm(cfg.d_model, cfg)
    if not cfg.tie_embeddings:
      self.lm_head_DV = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                               cfg.weight_dtype, cfg.d_model)

  def __call__(self, tokens_BT, positions_BT, *, segment_ids_BT=None,
               cache: KVCache | SharedPrefixCache | None = None, cache_index=None,
               kv_valid_BS=None, return_hidden: bool = False, adapter=None, dropout_rng=None):
    """Returns (logits_BTV, cache), or (hidden_BTD, cache) with `return_hidden`.

    Callers that need logits at a few positions only (the last prompt token,
    the completion) take the hidden states and call `logits` on a slice.
    `adapter` [B] int picks each row's adapter, [B, T] each token's (packed rows of
    several adapters' examples; -1: the base alone), else
    `active_adapter` serves every row; `dropout_rng` (training only) turns on the
    adapters' input dropout. Both are ignored by a model without adapters.
    """
    cfg, dt = self.cfg, self.cfg.compute_dtype
    T = tokens_BT.shape[1]
    if cache is not None and (cache_index is None or kv_valid_BS is None):
      raise ValueError("decoding with a cache needs cache_index and kv_valid_BS")
    shared = cache.prefix if isinstance(cache, SharedPrefixCache) else None
    if shared is not None:
      if T != 1:
        raise ValueError(f"a SharedPrefixCache serves decoding (one token per row), got T={T}")
      cache = cache.rows
    if cache is None and kv_valid_BS is not None:
      raise ValueError("kv_valid_BS applies to cached decoding; pass segment_ids_BT instead")
    kv_valid_BS = kv_valid_BS if cache is not None else None
    mask_BTS = attention_mask(T, segment_ids_BT, cache_index=cache_index, kv_valid_BS=kv_valid_BS)
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_base, cfg.rope_scaling)
    local_mask_BTS = local_inv_freq = None
    if "local" in cfg.layer_types:
      local_mask_BTS = attention_mask(T, segment_ids_BT, cache_index=cache_index,
                                      kv_valid_BS=kv_valid_BS, window=cfg.sliding_window)
      local_inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_local_base, None)
    x_BTD = jnp.take(self.embed_VD[...], tokens_BT, axis=0).astype(dt)
    if cfg.embed_scale:  # the factor rounded to the compute dtype first, as transformers does
      x_BTD = x_BTD * jnp.asarray(math.sqrt(cfg.d_model), dt)
    x_BTD = sharding.constrain_activation(x_BTD)
    if self.lora_cfg is None:
      adapter = None  # no adapter path at all
    elif adapter is None:
      adapter = None if self.active_adapter < 0 else jnp.asarray(self.active_adapter, jnp.int32)
    if adapter is None or not self.lora_cfg.dropout:
      dropout_rng = None
    if cfg.scan_layers:
      x_BTD, new_cache = self._scan_layers(
          x_BTD, positions_BT, mask_BTS, inv_freq, local_mask_BTS, local_inv_freq, cache,
          shared, cache_index, adapter, dropout_rng)
    else:
      forward = _remat_block_forward if cfg.remat else _block_forward
      new_cache = [] if cache is not None else None
      for i, block in enumerate(self.layers):
        local = cfg.is_local(i)
        x_BTD, layer_cache = forward(block, x_BTD, positions_BT,
                                     local_mask_BTS if local else mask_BTS,
                                     local_inv_freq if local else inv_freq,
                                     None if cache is None else cache[i] if shared is None
                                     else _SharedLayer(cache[i], shared[i]), cache_index, adapter,
                                     None if dropout_rng is None else jax.random.fold_in(
                                         dropout_rng, i))
        if cache is not None:
          new_cache.append(layer_cache)
    if shared is not None:
      new_cache = SharedPrefixCache(new_cache, shared)
    x_BTD = self.final_norm(x_BTD)
    if return_hidden:
      return x_BTD, new_cache
    return self.logits(x_BTD), new_cache

  def _scan_layers(self, x_BTD, positions_BT, mask_BTS, inv_freq_h, local_mask_BTS,
                   local_inv_freq_h, cache, shared, cache_index, adapter, dropout_rng):
    """The stacked layers under lax.scan (remat per layer with cfg.remat).

    Each step gets its layer's parameters, index, local flag and RoPE frequencies
    from per-layer arrays; the cache (a StackedCache) rides in the carry (decoding:
    updated in place), or with remat over several tokens its layer slices are scanned
    in and out; a shared prefix (SharedPrefixCache.prefix, read only) is indexed per layer.
    """
    cfg = self.cfg
    graphdef, state = nnx.split(self.layers)
    local_Y = jnp.asarray([cfg.is_local(i) for i in range(cfg.n_layers)])
    inv_freq_Yh = jnp.stack([local_inv_freq_h if cfg.is_local(i) else inv_freq_h
                             for i in range(cfg.n_layers)])

    def mask_and_rng(i, local):  # layer i's attention mask and dropout key
      mask = mask_BTS if local_mask_BTS is None else jnp.where(local, local_mask_BTS, mask_BTS)
      return mask, None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)

    def layer(carry, xs):
      x_BTD, stack = carry
      state, i, local, inv_freq_h = xs
      mask, rng = mask_and_rng(i, local)
      layer_cache = None if stack is None else (stack, i) if shared is None else _SharedLayer(
          (stack, i), (shared, i))
      x_BTD, stack = nnx.merge(graphdef, state)(
          x_BTD, positions_BT, mask, inv_freq_h, layer_cache, cache_index, adapter, rng)
      return (x_BTD, stack), None

    xs = (state, jnp.arange(cfg.n_layers), local_Y, inv_freq_Yh)
    if cfg.remat and cache is not None and shared is None and x_BTD.shape[1] > 1:
      # Differentiated with a cache (GRPO's prompt-then-completion forward): remat saves
      # each step's inputs, and a carried stack would be saved whole at every layer
      # (memory quadratic in depth). Each layer's slice goes in and out as scanned data.
      def layer_slices(x_BTD, xs):
        state, i, local, inv_freq_h, k_BSKH, v_BSKH = xs
        mask, rng = mask_and_rng(i, local)
        x_BTD, new = nnx.merge(graphdef, state)(
            x_BTD, positions_BT, mask, inv_freq_h, {"k": k_BSKH, "v": v_BSKH}, cache_index,
            adapter, rng)
        return x_BTD, (new["k"], new["v"])

      kv_Y = (jnp.moveaxis(cache.k_BSKYH, 3, 0), jnp.moveaxis(cache.v_BSKYH, 3, 0))
      x_BTD, (k_YBSKH, v_YBSKH) = jax.lax.scan(
          jax.checkpoint(layer_slices, prevent_cse=False), x_BTD, xs + kv_Y)
      return x_BTD, StackedCache(jnp.moveaxis(k_YBSKH, 0, 3), jnp.moveaxis(v_YBSKH, 0, 3))
    if cfg.remat:
      layer = jax.checkpoint(layer, prevent_cse=False)
    (x_BTD, cache), _ = jax.lax.scan(layer, (x_BTD, cache), xs)
    return x_BTD, cache

  def logits(self, x_BTD):
    """float32 logits from final hidden states (after the final norm), soft-capped if set."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    if cfg.tie_embeddings:
      logits_BTV = jnp.einsum("BTD,VD->BTV", x_BTD, self.embed_VD[...].astype(dt),
                              preferred_element_type=jnp.float32)
    else:
      logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, self.lm_head_DV[...].astype(dt),
                              preferred_element_type=jnp.float32)
    if cfg.final_logit_softcap:
      logits_BTV = cfg.final_logit_softcap * jnp.tanh(logits_BTV / cfg.final_logit_softcap)
    return logits_BTV


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
  """A zeroed cache with `max_len` slots per sequence, in the layout of cfg.scan_layers."""
  if cfg.scan_layers:
    shape = (batch, max_len, cfg.n_kv_heads, cfg.n_layers, cfg.head_dim)
    return StackedCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
  shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
          for _ in range(cfg.n_layers)]
