"""The decoder: shapes, causality, sharding, and a plain NumPy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepimagine_jax import model as M
from deepimagine_jax import sharding as S
from deepimagine_jax.config import ModelConfig, RopeScaling


def _inputs(cfg, B=3, T=12, seed=1):
  tok = jax.random.randint(jax.random.key(seed), (B, T), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  return tok, pos


@pytest.fixture(scope="module")
def tiny():
  cfg = ModelConfig.tiny()
  return cfg, M.Transformer(cfg, nnx.Rngs(0))


def test_shapes_and_finite(tiny):
  cfg, model = tiny
  tok, pos = _inputs(cfg)
  logits, cache = model(tok, pos)
  assert logits.shape == (3, 12, cfg.vocab_size) and logits.dtype == jnp.float32
  assert cache is None
  assert bool(jnp.isfinite(logits).all())


def test_causal(tiny):
  cfg, model = tiny
  tok, pos = _inputs(cfg)
  t = 7
  tok2 = tok.at[:, t].set((tok[:, t] + 1) % cfg.vocab_size)
  a, _ = model(tok, pos)
  b, _ = model(tok2, pos)
  np.testing.assert_array_equal(np.asarray(a[:, :t]), np.asarray(b[:, :t]))
  assert not np.allclose(np.asarray(a[:, t]), np.asarray(b[:, t]))


def test_segments_are_isolated(tiny):
  """Packed sequences: tokens of segment 2 never see segment 1."""
  cfg, model = tiny
  tok, _ = _inputs(cfg, B=1, T=10)
  seg = jnp.array([[1] * 4 + [2] * 6])
  pos = jnp.array([list(range(4)) + list(range(6))])
  packed, _ = model(tok, pos, segment_ids_BT=seg)
  alone, _ = model(tok[:, 4:], pos[:, 4:])
  np.testing.assert_allclose(np.asarray(packed[:, 4:]), np.asarray(alone), atol=1e-5)


def test_sharded_forward_equals_single_device(tiny):
  cfg, model = tiny
  tok, pos = _inputs(cfg, B=4)
  ref, _ = model(tok, pos)
  mesh = S.make_mesh(2, 2, 2)
  sharded = S.create_sharded(lambda: M.Transformer(cfg, nnx.Rngs(0)), mesh)
  wq = sharded.layers[0].attn.wq_DNH[...]
  assert wq.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)

  @nnx.jit
  def fwd(m, t, p):
    return m(t, p)[0]

  with jax.set_mesh(mesh):
    out = fwd(sharded, jax.device_put(tok, S.batch_sharding(mesh)),
              jax.device_put(pos, S.batch_sharding(mesh)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=1e-5)


def test_mesh_rest_axis():
  mesh = S.make_mesh(-1, 2, 1)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  with pytest.raises(ValueError):
    S.make_mesh(3, 1, 1)


# --- plain NumPy reference ---------------------------------------------------

def _np_rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _np_rope(x, pos, base, head_dim, scaling=None):
  inv = 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim)
  if scaling is not None:  # Llama 3.1 recipe, written out per frequency
    out = []
    for f in inv:
      wl = 2 * np.pi / f
      lo = scaling.original_max_position / scaling.low_freq_factor
      hi = scaling.original_max_position / scaling.high_freq_factor
      if wl < hi:
        out.append(f)
      elif wl > lo:
        out.append(f / scaling.factor)
      else:
        s = (scaling.original_max_position / wl - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        out.append((1 - s) * f / scaling.factor + s * f)
    inv = np.array(out)
  ang = pos[..., None] * inv  # B T h
  cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
  h = head_dim // 2
  x1, x2 = x[..., :h], x[..., h:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _np_forward(model, cfg, tok, pos):
  g = lambda p: np.asarray(p[...], np.float64)
  x = g(model.embed_VD)[np.asarray(tok)]
  pos = np.asarray(pos, np.float64)
  B, T = tok.shape
  G = cfg.n_heads // cfg.n_kv_heads
  for blk in model.layers:
    a = blk.attn
    h = _np_rms(x, g(blk.attn_norm.scale), cfg.norm_eps)
    q = np.einsum("btd,dnh->btnh", h, g(a.wq_DNH))
    k = np.einsum("btd,dkh->btkh", h, g(a.wk_DKH))
    v = np.einsum("btd,dkh->btkh", h, g(a.wv_DKH))
    if cfg.qk_norm:
      q = _np_rms(q, g(a.q_norm.scale), cfg.norm_eps)
      k = _np_rms(k, g(a.k_norm.scale), cfg.norm_eps)
    q = _np_rope(q, pos, cfg.rope_base, cfg.head_dim, cfg.rope_scaling)
    k = _np_rope(k, pos, cfg.rope_base, cfg.head_dim, cfg.rope_scaling)
    out = np.zeros_like(q)
    for n in range(cfg.n_heads):  # GQA written as an explicit head -> kv-head lookup
      kk, vv = k[:, :, n // G], v[:, :, n // G]
      s = np.einsum("bth,bsh->bts", q[:, :, n], kk) / np.sqrt(cfg.head_dim)
      s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[:, :, n] = np.einsum("bts,bsh->bth", p, vv)
    x = x + np.einsum("btnh,nhd->btd", out, g(a.wo_NHD))
    h = _np_rms(x, g(blk.mlp_norm.scale), cfg.norm_eps)
    gate = h @ g(blk.mlp.gate_DF)
    x = x + (gate / (1 + np.exp(-gate)) * (h @ g(blk.mlp.up_DF))) @ g(blk.mlp.down_FD)
  x = _np_rms(x, g(model.final_norm.scale), cfg.norm_eps)
  head = g(model.embed_VD).T if cfg.tie_embeddings else g(model.lm_head_DV)
  return x @ head


@pytest.mark.parametrize("variant", ["qwen3", "llama3"])
def test_matches_numpy_reference(variant):
  base = ModelConfig.tiny()
  if variant == "qwen3":
    cfg = base
  else:  # no QK-norm, untied head, Llama-3 RoPE scaling with a short original window
    cfg = base.replace(qk_norm=False, tie_embeddings=False, rope_base=500_000.0,
                       rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64))
  model = M.Transformer(cfg, nnx.Rngs(3))
  tok, _ = _inputs(cfg, B=2, T=9)
  pos = jnp.array([np.arange(9) + 5, np.arange(9) + 100])  # offsets exercise RoPE
  got, _ = model(tok, pos)
  want = _np_forward(model, cfg, tok, pos)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=1e-4)


def test_left_padded_prompt_matches_unpadded(tiny):
  """Position ids + padding mask make a left-padded row equal the bare sequence."""
  cfg, model = tiny
  tok, _ = _inputs(cfg, B=1, T=6)
  pad = 3
  padded = jnp.concatenate([jnp.zeros((1, pad), tok.dtype), tok], 1)
  valid = jnp.array([[False] * pad + [True] * 6])
  pos = jnp.maximum(jnp.cumsum(valid, 1) - 1, 0)
  cache = M.init_cache(cfg, 1, pad + 6)
  got, _ = model(padded, pos, cache=cache, cache_index=0, kv_valid_BS=valid)
  want, _ = model(tok, jnp.arange(6)[None])
  np.testing.assert_allclose(np.asarray(got[:, pad:]), np.asarray(want), atol=1e-5)


def test_cache_step_matches_full_forward(tiny):
  cfg, model = tiny
  tok, pos = _inputs(cfg, B=2, T=10)
  full, _ = model(tok, pos)
  cache = M.init_cache(cfg, 2, 10)
  valid = jnp.ones((2, 10), bool)
  _, cache = model(tok[:, :6], pos[:, :6], cache=cache, cache_index=0, kv_valid_BS=valid)
  for t in range(6, 10):
    step, cache = model(tok[:, t:t + 1], pos[:, t:t + 1], cache=cache, cache_index=t,
                        kv_valid_BS=valid)
    np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(full[:, t]), atol=1e-5)


def test_bf16_compute_and_remat_run():
  cfg = ModelConfig.tiny().replace(dtype="bfloat16", remat=True)
  model = M.Transformer(cfg, nnx.Rngs(0))
  tok, pos = _inputs(cfg)

  def loss(m):
    return jnp.mean(m(tok, pos)[0])

  grads = nnx.grad(loss)(model)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(bool(jnp.isfinite(g).all()) for g in leaves)


def test_presets_param_counts():
  assert abs(ModelConfig.small().num_params() - 5.2e6) < 0.1e6
  assert abs(ModelConfig.qwen3_0_6b().num_params() - 0.596e9) < 0.02e9
  assert abs(ModelConfig.llama3_8b().num_params() - 8.03e9) < 0.05e9
  for name in ("qwen3_1_7b", "qwen3_4b", "qwen3_8b"):
    getattr(ModelConfig, name)()
