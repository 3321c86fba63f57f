"""Hugging Face Qwen3 / Llama checkpoints (safetensors) to and from our Transformer.

HF stores a linear layer as `weight [out, in]` and computes `x @ weight.T`; we store
`[in, ...]` with the head axes split out, so import is a transpose plus a reshape.
HF checkpoints already use the "rotate_half" RoPE layout that model.apply_rope uses,
so q/k need no permutation (the parity test against transformers checks this).
Tensors are read one at a time on the host and placed straight onto their shards,
so a large model never sits whole on one device.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import re
from typing import Callable

import jax
import ml_dtypes
import numpy as np
import safetensors.numpy
from flax import nnx
from safetensors import safe_open

from deepimagine_jax import model as model_lib
from deepimagine_jax import sharding
from deepimagine_jax.config import ModelConfig, RopeScaling

SUPPORTED_MODEL_TYPES = ("qwen3", "llama")
INDEX_FILE = "model.safetensors.index.json"
# Buffers some old checkpoints carry that hold nothing a model needs.
_IGNORED_RE = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class HFImportError(ValueError):
  """A checkpoint or config that cannot become one of our models."""


# Config ---------------------------------------------------------------------


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
  """rope_theta and scaling from either transformers v4 keys or v5 `rope_parameters`."""
  params = hf.get("rope_parameters") or {}
  theta = hf.get("rope_theta", params.get("rope_theta", 10_000.0))
  scaling = hf.get("rope_scaling") or params
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type in (None, "default"):
    return float(theta), None
  if rope_type != "llama3":
    raise HFImportError(f"unsupported rope type {rope_type!r} (supported: default, llama3)")
  try:
    return float(theta), RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position=int(scaling["original_max_position_embeddings"]))
  except KeyError as e:
    raise HFImportError(f"llama3 rope scaling is missing {e.args[0]!r}: {scaling}") from None


def config_from_hf(hf: dict) -> ModelConfig:
  """A ModelConfig from a Hugging Face config.json dict (Qwen3 or Llama)."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise HFImportError(
        f"unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
  for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size"):
    if key not in hf:
      raise HFImportError(f"{model_type} config is missing {key!r}")
  # Features our decoder does not have: refuse rather than load a different model.
  if hf.get("hidden_act", "silu") != "silu":
    raise HFImportError(f"unsupported hidden_act {hf['hidden_act']!r} (only silu)")
  for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
    if hf.get(key):
      raise HFImportError(f"unsupported {key}=True in {model_type} config")
  theta, scaling = _rope_from_hf(hf)
  heads = hf["num_attention_heads"]
  return ModelConfig(
      vocab_size=hf["vocab_size"],
      d_model=hf["hidden_size"],
      n_layers=hf["num_hidden_layers"],
      n_heads=heads,
      n_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      mlp_dim=hf["intermediate_size"],
      rope_base=theta,
      rope_scaling=scaling,
      qk_norm=model_type == "qwen3",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      max_seq_len=int(hf.get("max_position_embeddings", 2048)))


def config_to_hf(cfg: ModelConfig) -> dict:
  """A config.json dict; legacy rope keys, which transformers v4 and v5 both read."""
  model_type = "qwen3" if cfg.qk_norm else "llama"
  arch = "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"
  out = {
      "architectures": [arch], "model_type": model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
      "intermediate_size": cfg.mlp_dim, "hidden_act": "silu",
      "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base, "rope_scaling": None,
      "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": cfg.max_seq_len,
      "attention_bias": False, "torch_dtype": cfg.param_dtype,
  }
  if model_type == "llama":
    out["mlp_bias"] = False
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    out["rope_scaling"] = {
        "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor,
        "original_max_position_embeddings": s.original_max_position}
  return out


# Name and layout mapping ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How one of our tensors relates to HF's `weight [out, in]`."""
  hf_shape: Callable[[tuple], tuple]
  to_ours: Callable[[np.ndarray, tuple], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


_COPY = _Layout(lambda s: s, lambda w, s: w, lambda w: w)
# Ours [in, ...out]: wq_DNH, wk/wv_DKH, gate/up_DF, lm_head_DV.
_IN_FIRST = _Layout(lambda s: (math.prod(s[1:]), s[0]),
                    lambda w, s: w.T.reshape(s), lambda w: w.reshape(w.shape[0], -1).T)
# Ours [...in, out]: wo_NHD, down_FD.
_OUT_LAST = _Layout(lambda s: (s[-1], math.prod(s[:-1])),
                    lambda w, s: w.T.reshape(s), lambda w: w.reshape(-1, w.shape[-1]).T)


def param_name_map(cfg: ModelConfig) -> dict[tuple, tuple[str, _Layout]]:
  """Our nnx state path -> (HF tensor name, layout)."""
  out = {("embed_VD",): ("model.embed_tokens.weight", _COPY),
         ("final_norm", "scale"): ("model.norm.weight", _COPY)}
  if not cfg.tie_embeddings:
    out[("lm_head_DV",)] = ("lm_head.weight", _IN_FIRST)
  for i in range(cfg.n_layers):
    p, h = ("layers", i), f"model.layers.{i}."
    out[p + ("attn_norm", "scale")] = (h + "input_layernorm.weight", _COPY)
    out[p + ("mlp_norm", "scale")] = (h + "post_attention_layernorm.weight", _COPY)
    for ours, theirs in (("wq_DNH", "q_proj"), ("wk_DKH", "k_proj"), ("wv_DKH", "v_proj")):
      out[p + ("attn", ours)] = (h + f"self_attn.{theirs}.weight", _IN_FIRST)
    out[p + ("attn", "wo_NHD")] = (h + "self_attn.o_proj.weight", _OUT_LAST)
    if cfg.qk_norm:
      out[p + ("attn", "q_norm", "scale")] = (h + "self_attn.q_norm.weight", _COPY)
      out[p + ("attn", "k_norm", "scale")] = (h + "self_attn.k_norm.weight", _COPY)
    for ours, theirs in (("gate_DF", "gate_proj"), ("up_DF", "up_proj")):
      out[p + ("mlp", ours)] = (h + f"mlp.{theirs}.weight", _IN_FIRST)
    out[p + ("mlp", "down_FD")] = (h + "mlp.down_proj.weight", _OUT_LAST)
  return out


# Reading --------------------------------------------------------------------


def _tensor_files(model_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  """HF tensor name -> the safetensors file holding it (sharded or single-file)."""
  index = model_dir / INDEX_FILE
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = {name: model_dir / f for name, f in weight_map.items()}
    for f in sorted(set(files.values())):
      if not f.exists():
        raise HFImportError(f"{index} names {f.name}, which does not exist")
    return files
  paths = sorted(model_dir.glob("*.safetensors"))
  if not paths:
    raise HFImportError(f"no *.safetensors files in {model_dir}")
  files = {}
  for path in paths:
    with safe_open(str(path), framework="numpy") as f:
      for name in f.keys():
        if name in files:
          raise HFImportError(f"tensor {name!r} is in both {files[name]} and {path}")
        files[name] = path
  return files


def _host_device():
  """Where safetensors' JAX reader puts a tensor: the CPU when JAX has one."""
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:
    return None


def _read(handle, name: str) -> np.ndarray:
  # framework="numpy" cannot read BF16; the flax reader can, and on the CPU device
  # np.asarray of its result is a host array (an ml_dtypes.bfloat16 one for BF16).
  with jax.default_device(_host_device()):
    return np.asarray(handle.get_tensor(name))


def _place(arr: np.ndarray, target) -> jax.Array:
  if target is None:
    return jax.device_put(arr)
  # Multi-host safe: each device pulls only its own slice of the host array.
  return jax.make_array_from_callback(arr.shape, target, lambda idx: arr[idx])


def load_hf_checkpoint(model_dir, mesh: jax.sharding.Mesh | None = None, *,
                       dtype: str = "float32", compute_dtype: str | None = None
                       ) -> tuple[ModelConfig, nnx.Module]:
  """Reads config.json + safetensors into a Transformer, sharded over `mesh` if given.

  `dtype` is the parameter dtype; `compute_dtype` (default: the same) the activations'.
  """
  model_dir = pathlib.Path(model_dir)
  config_path = model_dir / "config.json"
  if not config_path.exists():
    raise HFImportError(f"{config_path} does not exist")
  cfg = config_from_hf(json.loads(config_path.read_text())).replace(
      param_dtype=dtype, dtype=compute_dtype or dtype)
  np_dtype = _NP_DTYPES[cfg.param_dtype]

  abstract = nnx.eval_shape(lambda: model_lib.Transformer(cfg, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  targets = dict.fromkeys((p for p, _ in flat), None)
  if mesh is not None:
    targets = {p: v.get_value() for p, v in nnx.to_flat_state(sharding.state_shardings(state, mesh))}
  names = param_name_map(cfg)
  unmapped = [p for p, _ in flat if p not in names]
  if unmapped:
    raise HFImportError(f"no HF name known for our parameters {unmapped}")

  files = _tensor_files(model_dir)
  where = f"{model_dir} (config.json + {len(set(files.values()))} safetensors file(s))"
  missing = sorted(hf for hf, _ in names.values() if hf not in files)
  if missing:
    raise HFImportError(f"{where} lacks tensors: {', '.join(missing[:8])}"
                        + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
  wanted = {hf for hf, _ in names.values()}
  unexpected = sorted(n for n in files if n not in wanted and not _IGNORED_RE.match(n)
                      and not (cfg.tie_embeddings and n == "lm_head.weight"))
  if unexpected:
    raise HFImportError(f"{where} has tensors our {cfg.n_layers}-layer model has no place for "
                        f"(biases? more layers?): {', '.join(unexpected[:8])}")

  by_file: dict[pathlib.Path, list] = {}
  for path, var in flat:
    by_file.setdefault(files[names[path][0]], []).append((path, var))
  for file, items in sorted(by_file.items()):
    with safe_open(str(file), framework="flax") as handle:
      for path, var in items:
        hf_name, layout = names[path]
        want = layout.hf_shape(tuple(var.shape))
        got = tuple(handle.get_slice(hf_name).get_shape())
        if got != want:
          raise HFImportError(f"{file}: tensor {hf_name!r} has shape {list(got)}, expected "
                              f"{list(want)} from config.json")
        arr = np.ascontiguousarray(layout.to_ours(_read(handle, hf_name), tuple(var.shape)))
        var.set_value(_place(arr.astype(np_dtype), targets[path]))
  logging.info("loaded %s: %d tensors, %.1fM parameters", model_dir, len(flat),
               sum(math.prod(v.shape) for _, v in flat) / 1e6)
  return cfg, nnx.merge(graphdef, state)


# Writing --------------------------------------------------------------------


def _to_host(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def export_hf_checkpoint(model: nnx.Module, cfg: ModelConfig, out_dir, *,
                         max_shard_bytes: int = 5 * 2**30) -> pathlib.Path:
  """Writes config.json + safetensors (sharded with an index past max_shard_bytes).

  Every process gathers each tensor; only process 0 writes.
  """
  out_dir = pathlib.Path(out_dir)
  names = param_name_map(cfg)
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for path, var in flat:
    if path not in names:
      raise HFImportError(f"no HF name known for our parameter {path}")
    hf_name, layout = names[path]
    arr = np.ascontiguousarray(layout.to_hf(_to_host(var.get_value())))
    if shards[-1] and size + arr.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][hf_name] = arr
    size += arr.nbytes
  if jax.process_index() != 0:
    return out_dir
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
  meta = {"format": "pt"}  # transformers refuses files without it
  if len(shards) == 1:
    safetensors.numpy.save_file(shards[0], str(out_dir / "model.safetensors"), metadata=meta)
    return out_dir
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors.numpy.save_file(shard, str(out_dir / fname), metadata=meta)
    weight_map.update(dict.fromkeys(shard, fname))
  total = sum(a.nbytes for s in shards for a in s.values())
  (out_dir / INDEX_FILE).write_text(json.dumps(
      {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
  return out_dir
