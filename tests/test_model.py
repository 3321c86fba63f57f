"""The decoder: shapes, causality, sharding, and a plain NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from deepimagine_jax import hf_import
from deepimagine_jax import model as M
from deepimagine_jax import prefix
from deepimagine_jax import sampler
from deepimagine_jax import sharding as S
from deepimagine_jax.config import ModelConfig, RopeScaling


def _tiny_gemma3(**kw) -> ModelConfig:
  """The tiny shape with every Gemma 3 switch on: local, local, global; a short window."""
  return ModelConfig.tiny().replace(
      n_layers=3, mlp_activation="gelu_tanh", norm_unit_offset=True, post_norms=True,
      embed_scale=True, query_pre_attn_scalar=24.0, layer_types=("local", "local", "global"),
      sliding_window=3, rope_base=1_000_000.0, rope_local_base=10_000.0,
      rope_scaling=RopeScaling(factor=8.0, rope_type="linear"), **kw)


def _randomize_norms(model, seed=0):
  """Norm scales away from their init, so swapping two norms changes the output."""
  rng = np.random.RandomState(seed)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[-1] == "scale":
      var.set_value(jnp.asarray(0.3 * rng.randn(*var.shape), var.get_value().dtype))


def _inputs(cfg, B=3, T=12, seed=1):
  tok = jax.random.randint(jax.random.key(seed), (B, T), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  return tok, pos


@nnx.jit
def _call(model, *args, **kwargs):
  """model(*args, **kwargs) as one compiled program (eager dispatch compiles every op)."""
  return model(*args, **kwargs)


@pytest.fixture(scope="module")
def tiny():
  cfg = ModelConfig.tiny()
  return cfg, M.Transformer(cfg, nnx.Rngs(0))


def test_shapes_and_finite(tiny):
  cfg, model = tiny
  tok, pos = _inputs(cfg)
  logits, cache = _call(model, tok, pos)
  assert logits.shape == (3, 12, cfg.vocab_size) and logits.dtype == jnp.float32
  assert cache is None
  assert bool(jnp.isfinite(logits).all())


def test_causal(tiny):
  cfg, model = tiny
  tok, pos = _inputs(cfg)
  t = 7
  tok2 = tok.at[:, t].set((tok[:, t] + 1) % cfg.vocab_size)
  a, _ = _call(model, tok, pos)
  b, _ = _call(model, tok2, pos)
  np.testing.assert_array_equal(np.asarray(a[:, :t]), np.asarray(b[:, :t]))
  assert not np.allclose(np.asarray(a[:, t]), np.asarray(b[:, t]))


def test_segments_are_isolated(tiny):
  """Packed sequences: tokens of segment 2 never see segment 1."""
  cfg, model = tiny
  tok, _ = _inputs(cfg, B=1, T=10)
  seg = jnp.array([[1] * 4 + [2] * 6])
  pos = jnp.array([list(range(4)) + list(range(6))])
  packed, _ = _call(model, tok, pos, segment_ids_BT=seg)
  alone, _ = _call(model, tok[:, 4:], pos[:, 4:])
  np.testing.assert_allclose(np.asarray(packed[:, 4:]), np.asarray(alone), atol=1e-5)


def test_sharded_forward_equals_single_device(tiny):
  cfg, model = tiny
  tok, pos = _inputs(cfg, B=4)
  ref, _ = _call(model, tok, pos)
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

def _np_rms(x, w, eps, unit_offset=False):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * ((1 + w) if unit_offset else w)


def _np_gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_rope(x, pos, base, head_dim, scaling=None):
  inv = 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim)
  if scaling is not None and scaling.rope_type == "linear":  # positions / factor
    inv = inv / scaling.factor
  elif scaling is not None:  # Llama 3.1 recipe, written out per frequency
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
  """Written from the published recipes (Llama / Qwen3 / Gemma 3), one head at a time."""
  g = lambda p: np.asarray(p[...], np.float64)
  rms = lambda x, norm: _np_rms(x, g(norm.scale), cfg.norm_eps, cfg.norm_unit_offset)
  x = g(model.embed_VD)[np.asarray(tok)] * (np.sqrt(cfg.d_model) if cfg.embed_scale else 1.0)
  pos = np.asarray(pos, np.float64)
  B, T = tok.shape
  G = cfg.n_heads // cfg.n_kv_heads
  t_idx, s_idx = np.arange(T)[:, None], np.arange(T)[None, :]
  for i, blk in enumerate(model.layers):
    local = bool(cfg.layer_types) and cfg.layer_types[i] == "local"
    base, scaling = (cfg.rope_local_base, None) if local else (cfg.rope_base, cfg.rope_scaling)
    allowed = s_idx <= t_idx
    if local:  # the query and the sliding_window - 1 tokens before it
      allowed &= t_idx - s_idx < cfg.sliding_window
    a = blk.attn
    h = rms(x, blk.attn_norm)
    q = np.einsum("btd,dnh->btnh", h, g(a.wq_DNH))
    k = np.einsum("btd,dkh->btkh", h, g(a.wk_DKH))
    v = np.einsum("btd,dkh->btkh", h, g(a.wv_DKH))
    if cfg.qk_norm:
      q, k = rms(q, a.q_norm), rms(k, a.k_norm)
    q = _np_rope(q, pos, base, cfg.head_dim, scaling)
    k = _np_rope(k, pos, base, cfg.head_dim, scaling)
    out = np.zeros_like(q)
    for n in range(cfg.n_heads):  # GQA written as an explicit head -> kv-head lookup
      kk, vv = k[:, :, n // G], v[:, :, n // G]
      s = np.einsum("bth,bsh->bts", q[:, :, n], kk) / np.sqrt(
          cfg.query_pre_attn_scalar or cfg.head_dim)
      s = np.where(allowed, s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[:, :, n] = np.einsum("bts,bsh->bth", p, vv)
    o = np.einsum("btnh,nhd->btd", out, g(a.wo_NHD))
    x = x + (rms(o, blk.post_attn_norm) if cfg.post_norms else o)
    h = rms(x, blk.mlp_norm)
    gate = h @ g(blk.mlp.gate_DF)
    act = _np_gelu_tanh(gate) if cfg.mlp_activation == "gelu_tanh" else gate / (1 + np.exp(-gate))
    o = (act * (h @ g(blk.mlp.up_DF))) @ g(blk.mlp.down_FD)
    x = x + (rms(o, blk.post_mlp_norm) if cfg.post_norms else o)
  x = rms(x, model.final_norm)
  head = g(model.embed_VD).T if cfg.tie_embeddings else g(model.lm_head_DV)
  logits = x @ head
  if cfg.final_logit_softcap:
    logits = cfg.final_logit_softcap * np.tanh(logits / cfg.final_logit_softcap)
  return logits


@pytest.mark.parametrize("variant", ["qwen3", "llama3", "gemma3"])
def test_matches_numpy_reference(variant):
  base = ModelConfig.tiny()
  if variant == "qwen3":
    cfg = base
  elif variant == "llama3":  # no QK-norm, untied head, Llama-3 RoPE scaling, short original window
    cfg = base.replace(qk_norm=False, tie_embeddings=False, rope_base=500_000.0,
                       rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64))
  else:  # every Gemma 3 switch, and a soft cap (Gemma 2's; off in Gemma 3) that bites
    cfg = _tiny_gemma3(final_logit_softcap=2.0)
  model = M.Transformer(cfg, nnx.Rngs(3))
  if variant == "gemma3":
    _randomize_norms(model)
  tok, _ = _inputs(cfg, B=2, T=9)
  pos = jnp.array([np.arange(9) + 5, np.arange(9) + 100])  # offsets exercise RoPE
  got, _ = _call(model, tok, pos)
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
  got, _ = _call(model, padded, pos, cache=cache, cache_index=0, kv_valid_BS=valid)
  want, _ = _call(model, tok, jnp.arange(6)[None])
  np.testing.assert_allclose(np.asarray(got[:, pad:]), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_cache_step_matches_full_forward(tiny, arch):
  """Prefill 6 tokens, then decode one at a time; Gemma's window (3) is passed early."""
  cfg, model = tiny
  if arch == "gemma3":
    cfg = _tiny_gemma3()
    model = M.Transformer(cfg, nnx.Rngs(1))
    _randomize_norms(model)
  tok, pos = _inputs(cfg, B=2, T=10)
  full, _ = _call(model, tok, pos)
  cache = M.init_cache(cfg, 2, 10)
  valid = jnp.ones((2, 10), bool)
  pre, cache = _call(model, tok[:, :6], pos[:, :6], cache=cache, cache_index=0, kv_valid_BS=valid)
  np.testing.assert_allclose(np.asarray(pre), np.asarray(full[:, :6]), atol=1e-5)
  for t in range(6, 10):
    step, cache = _call(model, tok[:, t:t + 1], pos[:, t:t + 1], cache=cache, cache_index=t,
                        kv_valid_BS=valid)
    np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(full[:, t]), atol=1e-5)
  if arch == "gemma3":  # the window matters: without it the same cache gives other logits
    unwindowed = nnx.merge(nnx.graphdef(M.Transformer(cfg.replace(
        layer_types=("global",) * 3), nnx.Rngs(1))), nnx.state(model))
    other, _ = _call(unwindowed, tok, pos)
    assert np.abs(np.asarray(other[:, 3:]) - np.asarray(full[:, 3:])).max() > 1e-2


def test_sliding_window_mask():
  """Causal and at most `window` slots back, over the cache's slots too."""
  m = np.asarray(M.attention_mask(5, window=2)[0])
  np.testing.assert_array_equal(m, np.eye(5, dtype=bool) | np.eye(5, k=-1, dtype=bool))
  valid = jnp.array([[False, True, True, True, True, True]])
  m = np.asarray(M.attention_mask(2, cache_index=4, kv_valid_BS=valid, window=3)[0])
  np.testing.assert_array_equal(m, [[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]])


def test_greedy_sampler_past_the_window_matches_a_full_forward():
  """The sampler's cached decode (one row left-padded) is greedy under a full forward of
  the finished sequence: each new token is the argmax at the slot before it."""
  cfg = _tiny_gemma3()
  model = M.Transformer(cfg, nnx.Rngs(2))
  _randomize_norms(model, seed=4)
  tok, _ = _inputs(cfg, B=2, T=5, seed=7)
  mask = jnp.array([[1] * 5, [0, 0, 1, 1, 1]], bool)
  graphdef, params = nnx.split(model)
  out = sampler.sample(graphdef, params, tok, mask, jax.random.key(0), max_new_tokens=6,
                       temperature=0.0)
  seq_mask = out.sequence_mask.astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(seq_mask, 1) - 1, 0)
  logits, _ = _call(model, out.sequences, positions, segment_ids_BT=seq_mask)
  greedy = np.asarray(jnp.argmax(logits[:, 4:-1], -1))
  np.testing.assert_array_equal(np.asarray(out.tokens), greedy)


def test_bf16_compute_and_remat_run():
  cfg = ModelConfig.tiny().replace(dtype="bfloat16", remat=True)
  model = M.Transformer(cfg, nnx.Rngs(0))
  tok, pos = _inputs(cfg)

  def loss(m):
    return jnp.mean(m(tok, pos)[0])

  grads = nnx.jit(nnx.grad(loss))(model)  # jitted: remat's eager dispatch is slow
  leaves = jax.tree.leaves(grads)
  assert leaves and all(bool(jnp.isfinite(g).all()) for g in leaves)


def test_presets_param_counts():
  assert abs(ModelConfig.small().num_params() - 5.2e6) < 0.1e6
  assert abs(ModelConfig.qwen3_0_6b().num_params() - 0.596e9) < 0.02e9
  assert abs(ModelConfig.llama3_8b().num_params() - 8.03e9) < 0.05e9
  for name in ("qwen3_1_7b", "qwen3_4b", "qwen3_8b"):
    getattr(ModelConfig, name)()


# Gemma 3 text parameters as Google publishes them (the Keras Hub presets), counted
# over the 262,144-token vocabulary; the HF multimodal checkpoints add 64 embedding rows.
_GEMMA3_PUBLISHED = {"gemma3_1b": 999_885_952, "gemma3_4b": 3_880_099_328,
                     "gemma3_12b": 11_765_788_416, "gemma3_27b": 27_009_002_240}


@pytest.mark.parametrize("name", list(_GEMMA3_PUBLISHED))
def test_gemma3_presets(name):
  cfg = getattr(ModelConfig, name)()
  assert cfg.replace(vocab_size=262_144).num_params() == _GEMMA3_PUBLISHED[name]
  assert cfg.vocab_size == (262_144 if name == "gemma3_1b" else 262_208)
  # Every sixth layer global, the last of each six; the rest see a window.
  assert [i for i in range(cfg.n_layers) if not cfg.is_local(i)] == list(
      range(5, cfg.n_layers, 6))
  # The same shape in transformers (on the meta device: no memory) has as many parameters.
  hf_cfg = transformers.Gemma3TextConfig(**{
      k: v for k, v in hf_import.config_to_hf(cfg).items() if k not in ("architectures",)})
  with torch.device("meta"):
    hf = transformers.Gemma3ForCausalLM(hf_cfg)
  assert sum(p.numel() for p in hf.parameters()) == cfg.num_params()
  assert hf_cfg.layer_types.count("full_attention") == cfg.n_layers // 6
  assert hf_cfg.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0


# The scanned layout (cfg.scan_layers): the same function as the unrolled one ---------


def _stacked(model_unrolled):
  """The unrolled model's layer parameters stacked on a leading axis, by path below a layer."""
  flat = nnx.to_flat_state(nnx.state(model_unrolled.layers, nnx.Param))
  by_path = {}
  for path, var in flat:
    by_path.setdefault(path[1:], []).append(np.asarray(var.get_value()))
  return {p: np.stack(vs) for p, vs in by_path.items()}


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_scanned_layers_equal_unrolled(arch):
  """Same seed, same weights in both layouts; logits (full and cached decode) and
  gradients (through remat) agree in float32. Gemma's local / global layers (window 3,
  two RoPE bases) reach the scan as per-layer arrays."""
  cfg = _tiny_gemma3(remat=True) if arch == "gemma3" else ModelConfig.tiny().replace(
      n_layers=3, remat=True)
  unrolled = M.Transformer(cfg, nnx.Rngs(3))
  scanned = M.Transformer(cfg.replace(scan_layers=True), nnx.Rngs(3))
  want = _stacked(unrolled)
  for path, var in nnx.to_flat_state(nnx.state(scanned.layers, nnx.Param)):
    np.testing.assert_array_equal(np.asarray(var.get_value()), want[path], err_msg=str(path))
    assert var.get_metadata()["logical_axes"][0] == "layers"
  if arch == "gemma3":  # norms away from 0 (Gemma's start at 0), copied into the stack
    _randomize_norms(unrolled)
    scanned.final_norm.scale.set_value(unrolled.final_norm.scale.get_value())
    want = _stacked(unrolled)
    for path, var in nnx.to_flat_state(nnx.state(scanned.layers, nnx.Param)):
      var.set_value(jnp.asarray(want[path]))

  tok, pos = _inputs(cfg, B=2, T=10)

  @nnx.jit  # one program per layout (eager dispatch would compile every op of every layer)
  def run(model):
    full, _ = model(tok, pos)
    cache = M.init_cache(model.cfg, 2, 10)
    valid = jnp.ones((2, 10), bool)
    _, cache = model(tok[:, :8], pos[:, :8], cache=cache, cache_index=0, kv_valid_BS=valid)
    step, cache = model(tok[:, 8:9], pos[:, 8:9], cache=cache, cache_index=8, kv_valid_BS=valid)
    grads = nnx.grad(lambda m: jnp.mean(m(tok, pos)[0] ** 2))(model)
    # through a cache (GRPO's prompt-then-completion forward: remat over cache slices)
    cache_grads = nnx.grad(lambda m: jnp.sum(prefix.continuation_logprobs(
        m, tok[:, :6], jnp.ones((2, 6), jnp.int32), tok[:, 6:], group_size=1)))(model)
    return full, step, cache, (grads, cache_grads)

  outs = {name: run(model) for name, model in (("unrolled", unrolled), ("scanned", scanned))}
  (full_u, step_u, cache_u, grads_u), (full_s, step_s, cache_s, grads_s) = (
      outs["unrolled"], outs["scanned"])
  assert isinstance(cache_s, M.StackedCache) and len(cache_s) == cfg.n_layers
  np.testing.assert_allclose(np.asarray(full_s), np.asarray(full_u), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(step_s), np.asarray(step_u), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(step_s[:, 0]), np.asarray(full_u[:, 8]), atol=1e-5)
  for i in range(cfg.n_layers):  # cache[i] is layer i's keys in both layouts
    np.testing.assert_allclose(np.asarray(cache_s[i]["k"]), np.asarray(cache_u[i]["k"]),
                               atol=1e-5)
  for g_u, g_s in zip(grads_u, grads_s):
    g_u_stacked = _stacked(nnx.merge(nnx.graphdef(unrolled), g_u))
    for path, g in nnx.to_flat_state(g_s["layers"]):
      np.testing.assert_allclose(np.asarray(g.get_value()), g_u_stacked[path], atol=1e-5,
                                 rtol=1e-4, err_msg=str(path))


def test_scanned_layers_on_a_mesh_keep_the_layer_axis_whole():
  """The stacked layer axis is replicated (every device scans every layer); the sharded
  forward equals the single-device one."""
  cfg = ModelConfig.tiny().replace(scan_layers=True)
  mesh = S.make_mesh(2, 2, 2)
  model = S.create_sharded(lambda: M.Transformer(cfg, nnx.Rngs(0)), mesh)
  wq = model.layers.attn.wq_DNH.get_value()
  assert wq.shape[0] == cfg.n_layers
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  tok, pos = _inputs(cfg, B=4)
  want, _ = M.Transformer(cfg, nnx.Rngs(0))(tok, pos)
  with jax.set_mesh(mesh):
    got, _ = nnx.jit(lambda m, t, p: m(t, p))(model, jax.device_put(tok, S.batch_sharding(mesh)),
                                               jax.device_put(pos, S.batch_sharding(mesh)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_deep_presets_scan_and_small_ones_unroll():
  assert not any(getattr(ModelConfig, n)().scan_layers for n in ("tiny", "mini", "small"))
  assert all(getattr(ModelConfig, n)().scan_layers for n in (
      "qwen3_0_6b", "qwen3_1_7b", "qwen3_4b", "qwen3_8b", "llama3_8b", "gemma3_1b",
      "gemma3_4b", "gemma3_12b", "gemma3_27b"))


def test_sampler_on_a_mesh_gives_the_same_tokens_in_both_layouts():
  """The sampler (prefill, cache fanned out to 2 samples, sharded decode loop) runs the
  scanned layout's StackedCache through the same public API: greedy tokens and their
  log-probs equal the unrolled model's."""
  cfg = _tiny_gemma3()
  mesh = S.make_mesh(2, 2, 2)
  tok, _ = _inputs(cfg, B=2, T=5, seed=7)
  mask = jnp.array([[1] * 5, [0, 0, 1, 1, 1]], bool)
  outs = []
  for scan in (False, True):
    model = S.create_sharded(lambda: M.Transformer(cfg.replace(scan_layers=scan), nnx.Rngs(2)),
                             mesh)
    with jax.set_mesh(mesh):
      outs.append(sampler.sample(*nnx.split(model), tok, mask, jax.random.key(0),
                                 max_new_tokens=6, temperature=0.0, group_size=2))
  np.testing.assert_array_equal(np.asarray(outs[1].tokens), np.asarray(outs[0].tokens))
  np.testing.assert_allclose(np.asarray(outs[1].logprobs), np.asarray(outs[0].logprobs),
                             atol=1e-5)


@pytest.mark.parametrize("arch,scan", [("qwen3", False), ("gemma3", False), ("gemma3", True)])
def test_shared_prefix_cache_decodes_like_the_fanned_out_cache(arch, scan):
  """Decoding over a SharedPrefixCache (each prompt's slots once, its G rows' own slots
  apart) gives the logits of decoding over the prompt cache fanned out to every row:
  left padding, Gemma's window (3 slots, so a local layer's keys straddle the prompt /
  rows boundary) and both layer layouts."""
  from deepimagine_jax import prefix
  cfg = (_tiny_gemma3() if arch == "gemma3" else ModelConfig.tiny()).replace(scan_layers=scan)
  model = M.Transformer(cfg, nnx.Rngs(5))
  Q, G, P, C = 2, 3, 5, 3
  B = Q * G
  prompt, _ = _inputs(cfg, B=Q, T=P, seed=2)
  mask_QP = jnp.array([[1] * P, [0, 0, 1, 1, 1]], bool)
  new_BC = jax.random.randint(jax.random.key(9), (B, C), 0, cfg.vocab_size)
  pos_B = jnp.sum(prefix.fan_out(mask_QP, G), axis=1).astype(jnp.int32)
  valid_BL = jnp.concatenate([prefix.fan_out(mask_QP, G), jnp.zeros((B, C), bool)], axis=1)
  _, full, _ = prefix.prefill(model, prompt, mask_QP, extra_slots=C, cache_dtype=jnp.float32)
  _, own, _ = prefix.prefill(model, prompt, mask_QP, extra_slots=0, cache_dtype=jnp.float32)
  caches = {"fanned": prefix.fan_out(full, G),
            "shared": M.SharedPrefixCache(M.init_cache(cfg, B, C), own)}
  logits = {}
  for name, cache in caches.items():
    valid, out = valid_BL, []
    for t in range(C):
      valid = valid.at[:, P + t].set(True)
      step, cache = _call(model, new_BC[:, t:t + 1], (pos_B + t)[:, None], cache=cache,
                          cache_index=P + t, kv_valid_BS=valid)
      out.append(step[:, 0])
    logits[name] = np.stack(out, axis=1)
  assert isinstance(cache, M.SharedPrefixCache)
  np.testing.assert_allclose(logits["shared"], logits["fanned"], atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="SharedPrefixCache serves decoding"):
    model(new_BC[:, :2], jnp.zeros((B, 2), jnp.int32), cache=caches["shared"], cache_index=P,
          kv_valid_BS=valid_BL)
