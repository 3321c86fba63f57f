"""HF import/export: logit parity with randomly initialised transformers models (no download)."""
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

_SHAPE = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, intermediate_size=128, rms_norm_eps=1e-6)
# original_max_position_embeddings small, so llama3 scaling moves every band.
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES = {
    "qwen3_tied": lambda: transformers.Qwen3Config(
        **_SHAPE, tie_word_embeddings=True, rope_theta=1_000_000.0),
    "qwen3_untied": lambda: transformers.Qwen3Config(**_SHAPE, tie_word_embeddings=False),
    "llama3_scaled": lambda: transformers.LlamaConfig(
        **_SHAPE, tie_word_embeddings=False, rope_theta=500_000.0, rope_scaling=_LLAMA3_ROPE),
}
ATOL = 1e-4


def _hf_model(case: str, seed: int = 0) -> transformers.PreTrainedModel:
  """A float32 HF model with O(1) random weights, so a mapping slip moves the logits.

  HF's own init (std 0.02, norms at 1) would make logits tiny and every norm
  interchangeable; this makes each tensor matter.
  """
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(CASES[case]()).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif "embed_tokens" in name:
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
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
  assert cfg.qk_norm == case.startswith("qwen3")
  assert cfg.tie_embeddings == (case == "qwen3_tied")
  assert (cfg.rope_scaling is not None) == (case == "llama3_scaled")
  if case == "qwen3_untied":
    assert (path / H.INDEX_FILE).exists()
  tok = _tokens()
  ref = _hf_logits(hf, tok)
  ours = _ours(model, tok)
  diff = np.abs(ours - ref).max()
  print(f"{case}: max |logit diff| {diff:.2e} (max |logit| {np.abs(ref).max():.1f})")
  assert diff < ATOL
  assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero numbers


def test_llama3_scaling_is_exercised(checkpoints):
  """Without the scaling our logits would differ: the parity test above sees it."""
  hf, path = checkpoints["llama3_scaled"]
  cfg, model = H.load_hf_checkpoint(path)
  unscaled = cfg.replace(rope_scaling=None)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: M.Transformer(unscaled, nnx.Rngs(0))))
  plain = nnx.merge(graphdef, nnx.state(model))
  tok = _tokens()
  assert np.abs(_ours(plain, tok) - _hf_logits(hf, tok)).max() > 100 * ATOL


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


def test_sharded_load_matches_transformers(checkpoints):
  case = "qwen3_untied"
  hf, path = checkpoints[case]
  mesh = S.make_mesh(2, 2, 2)
  _, model = H.load_hf_checkpoint(path, mesh)
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
  out_dir = path.parent / (path.name + "_export")
  H.export_hf_checkpoint(model, model.cfg, out_dir)
  sd = hf.state_dict()
  with safe_open(str(out_dir / "model.safetensors"), framework="numpy") as f:
    assert set(f.keys()) == set(sd)
    for name in sd:
      np.testing.assert_array_equal(f.get_tensor(name), sd[name].numpy(), err_msg=name)
