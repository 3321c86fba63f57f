"""HF import/export: logit parity with randomly initialised transformers models (no download)."""
import copy
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx
from safetensors import safe_open

from deepimagine_jax import hf_import as H
from deepimagine_jax import model as M
from deepimagine_jax import sharding as S
from deepimagine_jax.config import ModelConfig

_SHAPE = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, intermediate_size=128, rms_norm_eps=1e-6)
# original_max_position_embeddings small, so llama3 scaling moves every band.
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# Gemma 3 as published (1 local : 1 global here), with a window (8) far shorter than the
# T = 40 tokens compared, a query scalar that is not head_dim, and 4b+'s linear scaling.
_GEMMA3 = dict(query_pre_attn_scalar=24, sliding_window=8,
               layer_types=["sliding_attention", "full_attention"],
               rope_parameters={
                   "full_attention": {"rope_type": "linear", "factor": 8.0,
                                      "rope_theta": 1_000_000.0},
                   "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
CASES = {
    "qwen3_tied": lambda: transformers.Qwen3Config(
        **_SHAPE, tie_word_embeddings=True, rope_theta=1_000_000.0),
    "qwen3_untied": lambda: transformers.Qwen3Config(**_SHAPE, tie_word_embeddings=False),
    "llama3_scaled": lambda: transformers.LlamaConfig(
        **_SHAPE, tie_word_embeddings=False, rope_theta=500_000.0, rope_scaling=_LLAMA3_ROPE),
    "gemma3": lambda: transformers.Gemma3TextConfig(**_SHAPE, **_GEMMA3),
}
ATOL = 1e-4


def _hf_model(case: str, seed: int = 0) -> transformers.PreTrainedModel:
  """A float32 HF model with O(1) random weights, so a mapping slip moves the logits.

  HF's own init (std 0.02, norms at 1) would make logits tiny and every norm
  interchangeable; this makes each tensor matter.
  """
  torch.manual_seed(seed)
  return _randomize(transformers.AutoModelForCausalLM.from_config(CASES[case]()).float().eval())


def _randomize(model):
  # Gemma's norms scale by (1 + weight): weight 0 is scale 1.
  unit = 0.0 if model.config.model_type.startswith("gemma") else 1.0
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(unit + 0.3 * torch.randn_like(p))
      elif "embed_tokens" in name:
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """case -> (HF model, directory holding its save_pretrained output)."""
  out = {}
  for case in CASES:
    model = _hf_model(case)
    path = tmp_path_factory.mktemp(case)
    # One case sharded, so model.safetensors.index.json is read too.
    model.save_pretrained(path, max_shard_size="40KB" if case == "qwen3_untied" else "1GB")
    out[case] = (model, path)
  return out


@pytest.fixture(params=list(CASES))
def saved(request, checkpoints):
  """(case, HF model, checkpoint directory) for each case."""
  return (request.param, *checkpoints[request.param])


# One batch shape throughout, so each jitted forward compiles once per model.
B, T = 3, 40


def _tokens(B=B, T=T, seed=3):
  return np.random.RandomState(seed).randint(0, _SHAPE["vocab_size"], (B, T))


def _hf_logits(model, tok, mask=None):
  kw = {}
  if mask is not None:
    kw = dict(attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0)))
  with torch.no_grad():
    return model(torch.tensor(tok), **kw).logits.numpy()


@nnx.jit
def _forward(model, tok_BT, pos_BT, seg_BT=None):
  return model(tok_BT, pos_BT, segment_ids_BT=seg_BT)[0]


@nnx.jit
def _forward_cached(model, tok_BT, pos_BT, cache, cache_index, kv_valid_BS):
  return model(tok_BT, pos_BT, cache=cache, cache_index=cache_index, kv_valid_BS=kv_valid_BS)


def _ours(model, tok):
  return np.asarray(_forward(model, jnp.asarray(tok), jnp.broadcast_to(jnp.arange(T), tok.shape)))


def test_logits_match_transformers(saved):
  case, hf, path = saved
  cfg, model = H.load_hf_checkpoint(path)
  assert cfg.qk_norm == case.startswith(("qwen3", "gemma3"))
  assert cfg.tie_embeddings == (case in ("qwen3_tied", "gemma3"))
  assert (cfg.rope_scaling is not None) == (case in ("llama3_scaled", "gemma3"))
  if case == "gemma3":
    assert cfg.layer_types == ("local", "global") and cfg.sliding_window == 8
    assert cfg.rope_scaling.rope_type == "linear" and cfg.query_pre_attn_scalar == 24
  if case == "qwen3_untied":
    assert (path / H.INDEX_FILE).exists()
  tok = _tokens()
  ref = _hf_logits(hf, tok)
  ours = _ours(model, tok)
  diff = np.abs(ours - ref).max()
  print(f"{case}: max |logit diff| {diff:.2e} (max |logit| {np.abs(ref).max():.1f})")
  assert diff < ATOL
  assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero numbers


def test_scanned_layout_matches_transformers_and_exports_back(saved, tmp_path):
  """Stacked layers (lax.scan): the same parity, and an export transformers reads back."""
  case, hf, path = saved
  cfg, model = H.load_hf_checkpoint(path, scan_layers=True)
  assert cfg.scan_layers and model.layers.attn.wq_DNH.shape[0] == cfg.n_layers
  tok = _tokens()
  ref = _hf_logits(hf, tok)
  diff = np.abs(_ours(model, tok) - ref).max()
  print(f"{case} scanned: max |logit diff| {diff:.2e}")
  assert diff < ATOL
  H.export_hf_checkpoint(model, cfg, tmp_path, max_shard_bytes=20_000)
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
  np.testing.assert_array_equal(_hf_logits(back, tok), ref)


def _as(model, cfg):
  """The same parameters under another config."""
  return nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: M.Transformer(cfg, nnx.Rngs(0)))),
                   nnx.state(model))


@pytest.mark.parametrize("case,change", [
    ("llama3_scaled", dict(rope_scaling=None)),
    ("gemma3", dict(rope_scaling=None)),
    ("gemma3", dict(layer_types=())),  # no sliding window
    ("gemma3", dict(rope_local_base=1_000_000.0)),
    ("gemma3", dict(query_pre_attn_scalar=0.0)),
])
def test_feature_is_exercised(checkpoints, case, change):
  """Without each feature our logits would differ: the parity test above sees it."""
  hf, path = checkpoints[case]
  cfg, model = H.load_hf_checkpoint(path)
  tok = _tokens()
  assert np.abs(_ours(_as(model, cfg.replace(**change)), tok) - _hf_logits(hf, tok)).max() > 0.1


def test_final_logit_softcap_matches_transformers(checkpoints):
  """Gemma 3 ships without a cap; a config that sets one (Gemma 2 used 30) is honoured."""
  hf, path = checkpoints["gemma3"]
  cfg, model = H.load_hf_checkpoint(path)
  tok = _tokens()
  ref = _hf_logits(hf, tok)
  hf.config.final_logit_softcapping = 10.0
  try:
    capped = _hf_logits(hf, tok)
  finally:
    hf.config.final_logit_softcapping = None
  assert np.abs(capped).max() < 10.0 < np.abs(ref).max()
  ours = _ours(_as(model, cfg.replace(final_logit_softcap=10.0)), tok)
  assert np.abs(ours - capped).max() < ATOL


def test_multimodal_gemma3_checkpoint_loads_its_text_decoder(tmp_path):
  """gemma-3-4b/12b/27b ship as Gemma3ForConditionalGeneration: the text part is read,
  the vision tower skipped, under both transformers' old and new tensor names."""
  torch.manual_seed(1)
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                image_size=28, patch_size=14)
  mm = transformers.Gemma3Config(text_config=CASES["gemma3"]().to_dict(), vision_config=vision,
                                 mm_tokens_per_image=4)
  hf = _randomize(transformers.Gemma3ForConditionalGeneration(mm).float().eval())
  hf.save_pretrained(tmp_path)
  text = transformers.Gemma3ForCausalLM(CASES["gemma3"]()).float().eval()
  sd = {k.replace("model.language_model.", "model."): v for k, v in hf.state_dict().items()}
  text.load_state_dict({k: v for k, v in sd.items() if k in text.state_dict()}, strict=True)
  tok = _tokens()
  ref = _hf_logits(text, tok)
  with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
    names = list(f.keys())
  # The names released checkpoints carry, which transformers still writes.
  assert any(n.startswith("vision_tower.") for n in names)
  assert any(n.startswith("language_model.model.layers.") for n in names)
  _, model = H.load_hf_checkpoint(tmp_path)
  assert np.abs(_ours(model, tok) - ref).max() < ATOL
  # The names transformers 4.52 - 4.5x wrote.
  new = {re.sub(r"^(vision_tower|multi_modal_projector)\.", r"model.\1.",
                n.replace("language_model.model.", "model.language_model.")): n for n in names}
  _rewrite(tmp_path, lambda t: {k: t[n] for k, n in new.items()})
  _, model = H.load_hf_checkpoint(tmp_path)
  assert np.abs(_ours(model, tok) - ref).max() < ATOL


def test_bf16_parity(saved):
  """bf16 weights and compute on both sides, against the float32 reference.

  Two bf16 forwards round differently (transformers rounds q.k^T and the MLP
  product to bf16 where we keep float32), so neither is "the" answer: ours must be
  no further from the float32 logits than transformers' own bf16 forward (1.5x
  slack), and the two must pick the same next token almost everywhere.
  """
  case, hf, path = saved
  _, model = H.load_hf_checkpoint(path, dtype="bfloat16")
  tok = _tokens()
  ref = _hf_logits(hf, tok)
  hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
  with torch.no_grad():
    theirs = hf_bf16(torch.tensor(tok)).logits.float().numpy()
  ours = _ours(model, tok)
  err_ours, err_hf = np.abs(ours - ref).max(), np.abs(theirs - ref).max()
  agree = (ours.argmax(-1) == theirs.argmax(-1)).mean()
  print(f"{case} bf16: max |ours - f32| {err_ours:.3f}, max |transformers bf16 - f32| "
        f"{err_hf:.3f}, max |ours - transformers bf16| {np.abs(ours - theirs).max():.3f} "
        f"(max |logit| {np.abs(ref).max():.1f}), argmax agreement {agree:.3f}")
  assert err_ours <= 1.5 * err_hf
  assert agree >= 0.95


def _left_padded():
  tok = _tokens(seed=5)
  lengths = np.array([T, T - 7, T - 19])
  mask = (np.arange(T)[None] >= (T - lengths)[:, None]).astype(np.int64)
  return tok * mask, mask


def test_left_padded_batch_segment_path(saved):
  _, hf, path = saved
  _, model = H.load_hf_checkpoint(path)
  tok, mask = _left_padded()
  ref = _hf_logits(hf, tok, mask)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  ours = np.asarray(_forward(model, jnp.asarray(tok), jnp.asarray(pos),
                             jnp.asarray(mask, jnp.int32)))
  real = mask.astype(bool)
  assert np.abs(ours[real] - ref[real]).max() < ATOL


def test_left_padded_prefill_and_decode_with_cache(saved):
  """Prefill a left-padded prompt into the KV cache, then decode one token."""
  _, hf, path = saved
  cfg, model = H.load_hf_checkpoint(path)
  tok, mask = _left_padded()
  nxt = _tokens(T=1, seed=6)
  full_tok, full_mask = np.concatenate([tok, nxt], 1), np.pad(mask, ((0, 0), (0, 1)), constant_values=1)
  pos = np.maximum(np.cumsum(full_mask, 1) - 1, 0)
  ref = _hf_logits(hf, full_tok, full_mask)
  cache = M.init_cache(cfg, B, T + 1)
  kv_valid = jnp.asarray(full_mask, bool)
  pre, cache = _forward_cached(model, jnp.asarray(tok), jnp.asarray(pos[:, :T]), cache, 0,
                               kv_valid)
  step, _ = _forward_cached(model, jnp.asarray(nxt), jnp.asarray(pos[:, T:]), cache, T, kv_valid)
  real = mask.astype(bool)
  assert np.abs(np.asarray(pre)[real] - ref[:, :T][real]).max() < ATOL
  assert np.abs(np.asarray(step)[:, 0] - ref[:, T]).max() < ATOL


def _flat_params(model):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_import_round_trip_is_exact(saved, tmp_path, dtype):
  case, hf, path = saved
  cfg, model = H.load_hf_checkpoint(path, dtype=dtype)
  # A tiny shard limit makes the export sharded, with an index.
  H.export_hf_checkpoint(model, cfg, tmp_path, max_shard_bytes=20_000)
  assert (tmp_path / H.INDEX_FILE).exists()
  cfg2, model2 = H.load_hf_checkpoint(tmp_path, dtype=dtype)
  assert cfg2 == cfg
  a, b = _flat_params(model), _flat_params(model2)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == np.dtype(dtype if dtype == "float32" else ml_dtypes.bfloat16), k
    np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
  if dtype == "float32":
    # transformers reads our export back into the same model.
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    tok = _tokens()
    ref = _hf_logits(hf, tok)
    np.testing.assert_array_equal(_hf_logits(back, tok), ref)


def test_bf16_checkpoint_is_read_exactly(tmp_path):
  hf = _hf_model("qwen3_untied").to(torch.bfloat16)
  hf.save_pretrained(tmp_path)
  with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
    assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
  _, model = H.load_hf_checkpoint(tmp_path, dtype="bfloat16")
  sd = hf.state_dict()
  want = sd["model.layers.1.self_attn.q_proj.weight"].float().numpy().T.reshape(64, 4, 16)
  got = np.asarray(model.layers[1].attn.wq_DNH.get_value()).astype(np.float32)
  np.testing.assert_array_equal(got, want)
  want = sd["model.layers.0.mlp.down_proj.weight"].float().numpy().T
  np.testing.assert_array_equal(np.asarray(model.layers[0].mlp.down_FD.get_value(), np.float32),
                                want)


def _rewrite(path, edit):
  """Rewrites model.safetensors through `edit(dict) -> dict`."""
  f = path / "model.safetensors"
  tensors = safetensors.numpy.load_file(str(f))
  safetensors.numpy.save_file(edit(tensors), str(f), metadata={"format": "pt"})


@pytest.fixture
def llama_dir(tmp_path):
  _hf_model("llama3_scaled").save_pretrained(tmp_path)
  return tmp_path


def test_missing_tensor_is_named(llama_dir):
  name = "model.layers.1.mlp.up_proj.weight"
  _rewrite(llama_dir, lambda t: {k: v for k, v in t.items() if k != name})
  with pytest.raises(H.HFImportError, match=f"lacks tensors: {name}"):
    H.load_hf_checkpoint(llama_dir)


def test_wrong_shape_is_named_with_file(llama_dir):
  name = "model.layers.0.self_attn.k_proj.weight"
  _rewrite(llama_dir, lambda t: {**t, name: t[name][:16]})
  with pytest.raises(H.HFImportError, match=r"model\.safetensors: tensor "
                     r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \[16, 64\], "
                     r"expected \[32, 64\]"):
    H.load_hf_checkpoint(llama_dir)


def test_unexpected_tensor_is_refused(llama_dir):
  name = "model.layers.0.self_attn.q_proj.bias"
  _rewrite(llama_dir, lambda t: {**t, name: np.zeros(64, np.float32)})
  with pytest.raises(H.HFImportError, match="q_proj.bias"):
    H.load_hf_checkpoint(llama_dir)


def test_config_errors():
  base = CASES["qwen3_tied"]().to_dict()
  with pytest.raises(H.HFImportError, match="unsupported model_type 'mistral'"):
    H.config_from_hf({**base, "model_type": "mistral"})
  with pytest.raises(H.HFImportError, match="unsupported rope type 'yarn'"):
    H.config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
  with pytest.raises(H.HFImportError, match="attention_bias"):
    H.config_from_hf({**base, "attention_bias": True})
  with pytest.raises(H.HFImportError, match="missing 'hidden_size'"):
    H.config_from_hf({k: v for k, v in base.items() if k != "hidden_size"})


def test_legacy_and_v5_rope_keys_agree():
  """transformers v4 config.json (rope_theta + rope_scaling) and v5 (rope_parameters)."""
  v5 = CASES["llama3_scaled"]().to_dict()
  legacy = {k: v for k, v in v5.items() if k != "rope_parameters"}
  legacy.update(rope_theta=500_000.0, rope_scaling={**_LLAMA3_ROPE, "type": "llama3"})
  a, b = H.config_from_hf(v5), H.config_from_hf(legacy)
  assert a == b and a.rope_base == 500_000.0
  assert a.rope_scaling.original_max_position == 64 and a.rope_scaling.factor == 8.0
  assert H.config_from_hf(H.config_to_hf(a)) == a


def test_gemma3_config_errors():
  base = CASES["gemma3"]().to_dict()
  with pytest.raises(H.HFImportError, match="attn_logit_softcapping"):
    H.config_from_hf({**base, "attn_logit_softcapping": 50.0})
  with pytest.raises(H.HFImportError, match="hidden_activation 'gelu'"):
    H.config_from_hf({**base, "hidden_activation": "gelu"})
  with pytest.raises(H.HFImportError, match="use_bidirectional_attention"):
    H.config_from_hf({**base, "use_bidirectional_attention": True})
  with pytest.raises(H.HFImportError, match="sliding-window layers"):
    H.config_from_hf({**base, "rope_parameters": {
        "full_attention": {"rope_type": "default"},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0}}})
  with pytest.raises(H.HFImportError, match="layer_types must be 2"):
    H.config_from_hf({**base, "layer_types": ["full_attention"]})
  with pytest.raises(H.HFImportError, match="missing 'text_config'"):
    H.config_from_hf({"model_type": "gemma3"})


def test_gemma3_legacy_config_keys_agree():
  """A transformers 4.5x config.json (rope_theta, rope_local_base_freq, rope_scaling,
  sliding_window_pattern) reads as the v5 one; the 12b's as the gemma3_12b preset."""
  v5 = H.config_from_hf(CASES["gemma3"]().to_dict())
  legacy = {k: v for k, v in CASES["gemma3"]().to_dict().items()
            if k not in ("rope_parameters", "layer_types")}
  legacy.update(rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, sliding_window_pattern=2,
                rope_scaling={"rope_type": "linear", "factor": 8.0})
  assert H.config_from_hf(legacy) == v5
  # google/gemma-3-12b-it config.json, the text part as published (transformers 4.50).
  published = {"model_type": "gemma3", "tie_word_embeddings": True, "text_config": {
      "hidden_size": 3840, "intermediate_size": 15360, "model_type": "gemma3_text",
      "num_attention_heads": 16, "num_hidden_layers": 48, "num_key_value_heads": 8,
      "head_dim": 256, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
      "rope_local_base_freq": 10_000, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
      "rope_theta": 1_000_000, "sliding_window": 1024, "sliding_window_pattern": 6,
      "max_position_embeddings": 131_072, "vocab_size": 262_208,
      "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": None,
      "attn_logit_softcapping": None}}
  assert H.config_from_hf(published) == ModelConfig.gemma3_12b()


@pytest.mark.parametrize("name", ["tiny", "qwen3_8b", "llama3_8b", "gemma3_1b", "gemma3_4b",
                                  "gemma3_12b", "gemma3_27b"])
def test_presets_round_trip_through_config_json(name):
  cfg = getattr(ModelConfig, name)()
  assert H.config_from_hf(H.config_to_hf(cfg)) == cfg


def test_config_no_hf_architecture_has_is_refused():
  with pytest.raises(H.HFImportError, match="mlp_activation"):
    H.config_to_hf(ModelConfig.gemma3_1b().replace(mlp_activation="silu"))
  with pytest.raises(H.HFImportError, match="embed_scale"):
    H.config_to_hf(ModelConfig.tiny().replace(embed_scale=True))


@pytest.mark.parametrize("scan", [False, True])
def test_sharded_load_matches_transformers(checkpoints, scan):
  case = "qwen3_untied"
  hf, path = checkpoints[case]
  mesh = S.make_mesh(2, 2, 2)
  _, model = H.load_hf_checkpoint(path, mesh, scan_layers=scan)
  if scan:  # the stacked layer axis stays whole on every device
    wq = model.layers.attn.wq_DNH.get_value()
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  else:
    wq = model.layers[0].attn.wq_DNH.get_value()
    assert wq.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert model.lm_head_DV.get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")

  tok = _tokens(B=4)
  pos = np.broadcast_to(np.arange(T), tok.shape)
  with jax.set_mesh(mesh):
    out = _forward(model, jax.device_put(jnp.asarray(tok, jnp.int32), S.batch_sharding(mesh)),
              jax.device_put(jnp.asarray(pos, jnp.int32), S.batch_sharding(mesh)))
  diff = np.abs(np.asarray(out) - _hf_logits(hf, tok)).max()
  print(f"{case} on mesh (2,2,2): max |logit diff| {diff:.2e}")
  assert diff < ATOL
  # Export gathers the shards back into HF's layout, bit for bit.
  out_dir = path.parent / (path.name + f"_export_{scan}")
  H.export_hf_checkpoint(model, model.cfg, out_dir)
  sd = hf.state_dict()
  with safe_open(str(out_dir / "model.safetensors"), framework="numpy") as f:
    assert set(f.keys()) == set(sd)
    for name in sd:
      np.testing.assert_array_equal(f.get_tensor(name), sd[name].numpy(), err_msg=name)
