"""Hugging Face Qwen3 / Llama / Gemma 3 checkpoints (safetensors) to and from our Transformer.

HF stores a linear layer as `weight [out, in]` and computes `x @ weight.T`; we store
`[in, ...]` with the head axes split out, so import is a transpose plus a reshape.
HF checkpoints already use the "rotate_half" RoPE layout that model.apply_rope uses,
so q/k need no permutation (the parity test against transformers checks this).
Tensors are read one at a time on the host and placed straight onto their shards,
so a large model never sits whole on one device.

Gemma 3 reads from a text-only checkpoint (`gemma3_text`, Gemma3ForCausalLM) or
from the text part of a multimodal one (`gemma3`: config under `text_config`,
tensors under `language_model.`; the vision tower is skipped). Export always
writes Gemma3ForCausalLM.
"""
from __future__ import annotations

import contextlib
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

from deepimagine_jax import lora as lora_lib
from deepimagine_jax import model as model_lib
from deepimagine_jax import sharding
from deepimagine_jax.config import ModelConfig, RopeScaling

SUPPORTED_MODEL_TYPES = ("qwen3", "llama", "gemma3_text", "gemma3")
INDEX_FILE = "model.safetensors.index.json"
# Buffers some old checkpoints carry that hold nothing a model needs.
_IGNORED_RE = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
# A multimodal Gemma 3 checkpoint: where its text decoder's tensors live (transformers
# < 4.52 and >= 4.52 names), and the vision parts a text model leaves alone.
_TEXT_PREFIXES = (("language_model.model.", "language_model.lm_head."),
                  ("model.language_model.", "lm_head."))
_VISION_RE = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")
_LAYER_TYPES_HF = {"local": "sliding_attention", "global": "full_attention"}
# A checkpoint this deep runs its layers under lax.scan (ModelConfig.scan_layers): the
# presets that scan have 26 or more; unrolled, 8 layers already compile slower.
SCAN_FROM_LAYERS = 8
_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class HFImportError(ValueError):
  """A checkpoint or config that cannot become one of our models."""


# Config ---------------------------------------------------------------------


def _scaling_from_hf(scaling: dict) -> RopeScaling | None:
  """One rope_scaling / rope_parameters dict: default (none), linear or llama3."""
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type in (None, "default"):
    return None
  if rope_type not in ("llama3", "linear"):
    raise HFImportError(f"unsupported rope type {rope_type!r} (supported: default, linear, llama3)")
  try:
    if rope_type == "linear":
      return RopeScaling(factor=float(scaling["factor"]), rope_type="linear")
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position=int(scaling["original_max_position_embeddings"]))
  except KeyError as e:
    raise HFImportError(f"{rope_type} rope scaling is missing {e.args[0]!r}: {scaling}") from None


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
  """rope_theta and scaling from either transformers v4 keys or v5 `rope_parameters`."""
  params = hf.get("rope_parameters") or {}
  theta = hf.get("rope_theta", params.get("rope_theta", 10_000.0))
  return float(theta), _scaling_from_hf(hf.get("rope_scaling") or params)


def _gemma3_rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None, float]:
  """(global theta, global scaling, local theta): v5 `rope_parameters` per layer type, or
  v4's rope_theta + rope_scaling (global) and rope_local_base_freq (local)."""
  params = hf.get("rope_parameters") or {}
  full = dict(params.get("full_attention") or {})
  sliding = dict(params.get("sliding_attention") or {})
  if hf.get("rope_scaling"):
    full.update(hf["rope_scaling"])
  theta = float(full.get("rope_theta", hf.get("rope_theta", 1_000_000.0)))
  local_theta = float(sliding.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0)))
  if _scaling_from_hf(sliding) is not None:
    raise HFImportError(f"rope scaling on sliding-window layers is not supported: {sliding}")
  return theta, _scaling_from_hf(full), local_theta


def _gemma3_fields(hf: dict) -> dict:
  """The ModelConfig fields only Gemma 3 sets, from its text config."""
  act = hf.get("hidden_activation", hf.get("hidden_act", "gelu_pytorch_tanh"))
  if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
    raise HFImportError(f"unsupported hidden_activation {act!r} (only gelu_pytorch_tanh)")
  for key in ("attn_logit_softcapping", "use_bidirectional_attention"):
    if hf.get(key):
      raise HFImportError(f"unsupported {key}={hf[key]!r} in gemma3 config")
  n = hf["num_hidden_layers"]
  hf_types = hf.get("layer_types") or [
      "full_attention" if (i + 1) % hf.get("sliding_window_pattern", 6) == 0
      else "sliding_attention" for i in range(n)]
  ours = {v: k for k, v in _LAYER_TYPES_HF.items()}
  if len(hf_types) != n or set(hf_types) - set(ours):
    raise HFImportError(f"gemma3 layer_types must be {n} of {sorted(ours)}, got {hf_types}")
  theta, scaling, local_theta = _gemma3_rope_from_hf(hf)
  layer_types = tuple(ours[t] for t in hf_types)
  return dict(
      rope_base=theta, rope_scaling=scaling, rope_local_base=local_theta,
      layer_types=layer_types if "local" in layer_types else (),
      sliding_window=int(hf.get("sliding_window") or 0),
      query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
      final_logit_softcap=float(hf.get("final_logit_softcapping") or 0.0),
      mlp_activation="gelu_tanh", norm_unit_offset=True, post_norms=True, embed_scale=True,
      qk_norm=True)


def config_from_hf(hf: dict) -> ModelConfig:
  """A ModelConfig from a Hugging Face config.json dict (Qwen3, Llama or Gemma 3)."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise HFImportError(
        f"unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
  if model_type == "gemma3":  # multimodal: the text decoder's config is nested
    if not isinstance(hf.get("text_config"), dict):
      raise HFImportError("gemma3 config is missing 'text_config'")
    hf = {"tie_word_embeddings": hf.get("tie_word_embeddings", True), **hf["text_config"],
          "model_type": "gemma3_text"}
    model_type = "gemma3_text"
  gemma = model_type == "gemma3_text"
  for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size"):
    if key not in hf:
      raise HFImportError(f"{model_type} config is missing {key!r}")
  # Features our decoder does not have: refuse rather than load a different model.
  if not gemma and hf.get("hidden_act", "silu") != "silu":
    raise HFImportError(f"unsupported hidden_act {hf['hidden_act']!r} (only silu)")
  for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
    if hf.get(key):
      raise HFImportError(f"unsupported {key}=True in {model_type} config")
  if gemma:
    fields = _gemma3_fields(hf)
  else:
    theta, scaling = _rope_from_hf(hf)
    fields = dict(rope_base=theta, rope_scaling=scaling, qk_norm=model_type == "qwen3")
  heads = hf["num_attention_heads"]
  return ModelConfig(
      vocab_size=hf["vocab_size"],
      d_model=hf["hidden_size"],
      n_layers=hf["num_hidden_layers"],
      n_heads=heads,
      n_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      mlp_dim=hf["intermediate_size"],
      tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      max_seq_len=int(hf.get("max_position_embeddings", 2048)),
      scan_layers=hf["num_hidden_layers"] >= SCAN_FROM_LAYERS, **fields)


def _hf_family(cfg: ModelConfig) -> str:
  """The HF model_type whose architecture is exactly this config; an error if none is."""
  gemma = dict(mlp_activation="gelu_tanh", norm_unit_offset=True, post_norms=True,
               embed_scale=True, qk_norm=True)
  if cfg.post_norms:
    wrong = {k: getattr(cfg, k) for k, v in gemma.items() if getattr(cfg, k) != v}
    if wrong:
      raise HFImportError(f"post_norms=True is Gemma 3, which also has {gemma}; got {wrong}")
    return "gemma3_text"
  plain = dict(mlp_activation="silu", norm_unit_offset=False, embed_scale=False,
               query_pre_attn_scalar=0.0, layer_types=(), final_logit_softcap=0.0)
  wrong = {k: getattr(cfg, k) for k, v in plain.items() if getattr(cfg, k) != v}
  if wrong:
    raise HFImportError(f"Qwen3 / Llama have {plain}; got {wrong} (no HF architecture)")
  return "qwen3" if cfg.qk_norm else "llama"


def _int_if_whole(x: float):
  """transformers declares query_pre_attn_scalar an int (and checks it)."""
  return int(x) if float(x).is_integer() else x


def _scaling_to_hf(s: RopeScaling | None) -> dict | None:
  if s is None:
    return None
  if s.rope_type == "linear":
    return {"rope_type": "linear", "factor": s.factor}
  return {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
          "high_freq_factor": s.high_freq_factor,
          "original_max_position_embeddings": s.original_max_position}


def config_to_hf(cfg: ModelConfig) -> dict:
  """A config.json dict; legacy rope keys, which transformers v4 and v5 both read."""
  model_type = _hf_family(cfg)
  arch = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
          "gemma3_text": "Gemma3ForCausalLM"}[model_type]
  out = {
      "architectures": [arch], "model_type": model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
      "intermediate_size": cfg.mlp_dim, "hidden_act": "silu",
      "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base,
      "rope_scaling": _scaling_to_hf(cfg.rope_scaling),
      "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": cfg.max_seq_len,
      "attention_bias": False, "torch_dtype": cfg.param_dtype,
  }
  if model_type == "llama":
    out["mlp_bias"] = False
  if model_type == "gemma3_text":
    del out["hidden_act"]
    out.update(
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar or cfg.head_dim),
        rope_local_base_freq=cfg.rope_local_base, sliding_window=cfg.sliding_window or None,
        layer_types=[_LAYER_TYPES_HF[t] for t in cfg.layer_types or ("global",) * cfg.n_layers],
        final_logit_softcapping=cfg.final_logit_softcap or None, attn_logit_softcapping=None)
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
    if cfg.post_norms:  # Gemma: HF's post_attention_layernorm is on the attention output
      out[p + ("post_attn_norm", "scale")] = (h + "post_attention_layernorm.weight", _COPY)
      out[p + ("mlp_norm", "scale")] = (h + "pre_feedforward_layernorm.weight", _COPY)
      out[p + ("post_mlp_norm", "scale")] = (h + "post_feedforward_layernorm.weight", _COPY)
    else:  # Llama / Qwen: HF's post_attention_layernorm is the MLP's input norm
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


def tensor_slots(cfg: ModelConfig) -> dict[tuple, list[tuple[str, _Layout]]]:
  """Our nnx state path -> its HF tensors: one, or one per layer for a stacked parameter.

  In the scanned layout (cfg.scan_layers) ("layers", "attn", "wq_DNH") holds every
  layer's q_proj on its leading axis, in layer order.
  """
  out: dict[tuple, list] = {}
  for path, hf in param_name_map(cfg).items():
    if cfg.scan_layers and path[0] == "layers":
      path = ("layers",) + path[2:]
    out.setdefault(path, []).append(hf)
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


def _text_tensors(files: dict[str, pathlib.Path]) -> dict[str, tuple[pathlib.Path, str]]:
  """Decoder tensor name (model.*, lm_head.*) -> (file, name stored there): a multimodal
  checkpoint's text tensors renamed, its vision tower and projector left out."""
  out = {}
  for model_prefix, head_prefix in _TEXT_PREFIXES:
    if any(n.startswith(model_prefix) for n in files):
      for name, path in files.items():
        if name.startswith(model_prefix):
          out["model." + name[len(model_prefix):]] = (path, name)
        elif name.startswith(head_prefix):
          out["lm_head." + name[len(head_prefix):]] = (path, name)
        elif not _VISION_RE.match(name):
          out[name] = (path, name)
      return out
  return {name: (path, name) for name, path in files.items()}


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
                       dtype: str = "float32", compute_dtype: str | None = None,
                       scan_layers: bool | None = None) -> tuple[ModelConfig, nnx.Module]:
  """Reads config.json + safetensors into a Transformer, sharded over `mesh` if given.

  `dtype` is the parameter dtype; `compute_dtype` (default: the same) the activations'.
  `scan_layers` picks the layer layout (None: config_from_hf's choice by depth).
  """
  model_dir = pathlib.Path(model_dir)
  config_path = model_dir / "config.json"
  if not config_path.exists():
    raise HFImportError(f"{config_path} does not exist")
  cfg = config_from_hf(json.loads(config_path.read_text())).replace(
      param_dtype=dtype, dtype=compute_dtype or dtype)
  if scan_layers is not None:
    cfg = cfg.replace(scan_layers=scan_layers)
  np_dtype = _NP_DTYPES[cfg.param_dtype]

  abstract = nnx.eval_shape(lambda: model_lib.Transformer(cfg, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  targets = dict.fromkeys((p for p, _ in flat), None)
  if mesh is not None:
    targets = {p: v.get_value() for p, v in nnx.to_flat_state(sharding.state_shardings(state, mesh))}
  slots = tensor_slots(cfg)
  unmapped = [p for p, _ in flat if p not in slots]
  if unmapped:
    raise HFImportError(f"no HF name known for our parameters {unmapped}")

  files = _text_tensors(_tensor_files(model_dir))
  where = f"{model_dir} (config.json + {len({f for f, _ in files.values()})} safetensors file(s))"
  wanted = {hf for tensors in slots.values() for hf, _ in tensors}
  missing = sorted(hf for hf in wanted if hf not in files)
  if missing:
    raise HFImportError(f"{where} lacks tensors: {', '.join(missing[:8])}"
                        + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
  unexpected = sorted(n for n in files if n not in wanted and not _IGNORED_RE.match(n)
                      and not (cfg.tie_embeddings and n == "lm_head.weight"))
  if unexpected:
    raise HFImportError(f"{where} has tensors our {cfg.n_layers}-layer model has no place for "
                        f"(biases? more layers?): {', '.join(unexpected[:8])}")

  with contextlib.ExitStack() as stack:
    handles = {f: stack.enter_context(safe_open(str(f), framework="flax"))
               for f in sorted({f for f, _ in files.values()})}

    def read(hf_name: str, layout: _Layout, shape: tuple) -> np.ndarray:
      file, stored = files[hf_name]
      want, got = layout.hf_shape(shape), tuple(handles[file].get_slice(stored).get_shape())
      if got != want:
        raise HFImportError(f"{file}: tensor {stored!r} has shape {list(got)}, expected "
                            f"{list(want)} from config.json")
      return layout.to_ours(_read(handles[file], stored), shape).astype(np_dtype)

    for path, var in flat:
      if cfg.scan_layers and path[0] == "layers":  # stacked: one HF tensor per layer
        arr = np.stack([read(hf, layout, tuple(var.shape[1:])) for hf, layout in slots[path]])
      else:
        arr = read(*slots[path][0], tuple(var.shape))
      var.set_value(_place(np.ascontiguousarray(arr), targets[path]))
  logging.info("loaded %s: %d tensors, %.1fM parameters", model_dir, len(flat),
               sum(math.prod(v.shape) for _, v in flat) / 1e6)
  return cfg, nnx.merge(graphdef, state)


# Writing --------------------------------------------------------------------


def _to_host(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def _adapter_of(model: nnx.Module, adapter: str | None) -> int:
  """The index of the adapter to write: the one named, else the model's active one."""
  if adapter is not None:
    return lora_lib.adapter_index(model.lora_cfg, adapter)
  if model.active_adapter < 0:
    raise HFImportError("the model's adapters are switched off (active_adapter -1): name the "
                        "adapter to write")
  return model.active_adapter


def export_hf_checkpoint(model: nnx.Module, cfg: ModelConfig, out_dir, *,
                         max_shard_bytes: int = 5 * 2**30,
                         adapter: str | None = None) -> pathlib.Path:
  """Writes config.json + safetensors (sharded with an index past max_shard_bytes).

  A model with LoRA adapters is written merged (W + scale * A B) with `adapter`,
  by default its active one: the function the model computes. Every process
  gathers each tensor; only process 0 writes.
  """
  out_dir = pathlib.Path(out_dir)
  if model.lora_cfg is not None:
    model = lora_lib.merged(model, _adapter_of(model, adapter))
  elif adapter is not None:
    raise HFImportError(f"adapter {adapter!r} asked for, but the model has no adapters")
  slots = tensor_slots(cfg)
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for path, var in flat:
    if path not in slots:
      raise HFImportError(f"no HF name known for our parameter {path}")
    value = _to_host(var.get_value())
    stacked = cfg.scan_layers and path[0] == "layers"
    for i, (hf_name, layout) in enumerate(slots[path]):
      arr = np.ascontiguousarray(layout.to_hf(value[i] if stacked else value))
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


# PEFT's names for our LoRA targets (the Hugging Face module names).
PEFT_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def _peft_layers(model: nnx.Module, cfg: ModelConfig, writable: bool = False):
  """Every adapter of `model` as (adapter module, stacked, A [Y, E, *in, r], B [Y, E, r, *out]
  on the host, [(layer i, PEFT name prefix)]): one layer is a stack of one. `writable`:
  copies the caller may change."""
  slots = tensor_slots(cfg)
  for path, module in model.iter_modules():
    stacked = cfg.scan_layers and tuple(path[:1]) == ("layers",)
    for ad in (module.lora.values() if getattr(module, "lora", None) else ()):
      a, b = _to_host(ad.a[...]), _to_host(ad.b[...])
      if writable:
        a, b = a.copy(), b.copy()
      if not stacked:
        a, b = a[None], b[None]
      layers = [(i, "base_model.model." + hf_weight.removesuffix(".weight"))
                for i, (hf_weight, _) in enumerate(slots[tuple(path) + (ad.weight,)])]
      yield ad, stacked, a, b, layers


def export_peft_adapter(model: nnx.Module, cfg: ModelConfig, out_dir, *,
                        adapter: str | None = None, base_model: str = "") -> pathlib.Path:
  """Writes one adapter alone as PEFT does: adapter_config.json + adapter_model.safetensors.

  `peft.PeftModel.from_pretrained(<the HF base model>, out_dir)` then computes
  what our model computes with that adapter. lora_A is [r, in], lora_B [out, r],
  in HF's flattening of the head axes (the same as the base weights').
  """
  if model.lora_cfg is None:
    raise HFImportError("the model has no LoRA adapters to export")
  lcfg, e = model.lora_cfg, _adapter_of(model, adapter)
  tensors = {}
  for _, _, a, b, layers in _peft_layers(model, cfg):
    for i, prefix in layers:
      tensors[prefix + ".lora_A.weight"] = np.ascontiguousarray(a[i, e].reshape(-1, lcfg.rank).T)
      tensors[prefix + ".lora_B.weight"] = np.ascontiguousarray(b[i, e].reshape(lcfg.rank, -1).T)
  out_dir = pathlib.Path(out_dir)
  if jax.process_index() != 0:
    return out_dir
  out_dir.mkdir(parents=True, exist_ok=True)
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lcfg.rank,
      "lora_alpha": lcfg.alpha, "lora_dropout": lcfg.dropout,
      "target_modules": sorted(PEFT_MODULES[t] for t in lcfg.targets), "bias": "none",
      "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
      "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
      "base_model_name_or_path": base_model or None,
  }
  (out_dir / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
  safetensors.numpy.save_file(tensors, str(out_dir / PEFT_WEIGHTS), metadata={"format": "pt"})
  return out_dir


def load_peft_adapter(model: nnx.Module, cfg: ModelConfig, adapter_dir, *, adapter: str) -> None:
  """Reads a PEFT adapter folder (export_peft_adapter's format) into adapter `adapter` of
  `model` (which has LoRA with the folder's rank and targets), in place, keeping shardings.

  A missing tensor, a rank or target that differs, or a shape that does not fit is an
  HFImportError naming the folder and the tensor.
  """
  adapter_dir = pathlib.Path(adapter_dir)
  if model.lora_cfg is None:
    raise HFImportError(f"{adapter_dir}: the model has no LoRA adapters to load into")
  lcfg, e = model.lora_cfg, lora_lib.adapter_index(model.lora_cfg, adapter)
  try:
    config = json.loads((adapter_dir / PEFT_CONFIG).read_text())
    tensors = safetensors.numpy.load_file(str(adapter_dir / PEFT_WEIGHTS))
  except (OSError, ValueError) as err:
    raise HFImportError(f"{adapter_dir}: not a readable PEFT adapter ({err})") from err
  want = sorted(PEFT_MODULES[t] for t in lcfg.targets)
  if config.get("r") != lcfg.rank or sorted(config.get("target_modules") or ()) != want:
    raise HFImportError(f"{adapter_dir / PEFT_CONFIG}: r={config.get('r')}, target_modules="
                        f"{config.get('target_modules')}; the model has r={lcfg.rank}, {want}")
  for ad, stacked, a, b, layers in _peft_layers(model, cfg, writable=True):
    for i, prefix in layers:
      for key, dst, layout in ((".lora_A.weight", a, "A"), (".lora_B.weight", b, "B")):
        if prefix + key not in tensors:
          raise HFImportError(f"{adapter_dir / PEFT_WEIGHTS}: no tensor {prefix + key}")
        t = tensors[prefix + key].T  # A: [in, r]; B: [r, out]
        if t.size != dst[i, e].size:
          raise HFImportError(f"{adapter_dir / PEFT_WEIGHTS}: {prefix + key} has shape "
                              f"{tensors[prefix + key].shape}, the model's is "
                              f"{dst[i, e].shape} ({layout})")
        dst[i, e] = t.reshape(dst[i, e].shape)
    for var, host in ((ad.a, a), (ad.b, b)):
      value = host if stacked else host[0]
      var.set_value(jax.device_put(value.astype(var[...].dtype), var[...].sharding))
