"""Typed configs: the ConfigDict becomes these frozen dataclasses once, in jobs.py.

`configs/*.py` declare every key once; here each section has one dataclass with
no defaults of its own, so a key is never read with a silent default. List-valued
keys are tuples in the configs and here. `ModelConfig` is the model's shape and
numerics, with named presets; `DataConfig` lives in data_pipeline (the pipeline
knows nothing of deepimagine_jax) and is re-exported here.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp

from data_pipeline.config import DataConfig  # noqa: F401 - re-exported: one place for configs
from data_pipeline.example import KINDS
from data_pipeline.facts import FACTORS
from deepimagine_jax import grpo
from deepimagine_jax import rewards


ROPE_SCALING_TYPES = ("llama3", "linear")
LAYER_TYPES = ("global", "local")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling: Llama-3's wavelength-dependent recipe, or "linear"
  (every frequency / factor: Gemma 3's global layers; the band fields unused)."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192
  rope_type: str = "llama3"

  def __post_init__(self):
    if self.rope_type not in ROPE_SCALING_TYPES:
      raise ValueError(f"RopeScaling.rope_type must be one of {ROPE_SCALING_TYPES}, "
                       f"got {self.rope_type!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama / Qwen / Gemma 3 family decoder.

  The Gemma 3 fields default to what Llama and Qwen do, so their presets (and
  checkpoints) are unchanged by them.
  """
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_base: float = 10_000.0  # of the global layers
  rope_scaling: RopeScaling | None = None  # of the global layers
  qk_norm: bool = False
  tie_embeddings: bool = True
  norm_eps: float = 1e-6
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype of activations and matmuls
  remat: bool = False  # jax.checkpoint each layer
  # Layers stacked on a leading axis and run by lax.scan: compile time flat in depth. The
  # deep presets scan; the 2-4 layer ones compile in seconds unrolled and keep the layout
  # (and so the checkpoints) they always had.
  scan_layers: bool = False
  max_seq_len: int = 2048
  mlp_activation: str = "silu"  # gate activation: "silu" (SwiGLU) | "gelu_tanh" (GeGLU, Gemma)
  norm_unit_offset: bool = False  # RMSNorm scales by (1 + w), w starting at 0 (Gemma)
  post_norms: bool = False  # an RMSNorm on the attention and MLP outputs too (Gemma 2 / 3)
  embed_scale: bool = False  # embeddings times sqrt(d_model) (Gemma); a tied head uses them raw
  query_pre_attn_scalar: float = 0.0  # attention logits times its ** -0.5; 0: head_dim
  layer_types: tuple[str, ...] = ()  # "global" | "local" per layer; (): all global
  sliding_window: int = 0  # a local layer's query sees itself and the window - 1 before it
  rope_local_base: float = 10_000.0  # RoPE base of the local layers (never scaled)
  final_logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap); 0: off

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in ("float32", "bfloat16"):
        raise ValueError(f"{name} must be float32 or bfloat16, got {getattr(self, name)!r}")
    if self.mlp_activation not in ("silu", "gelu_tanh"):
      raise ValueError(f"mlp_activation must be 'silu' or 'gelu_tanh', got {self.mlp_activation!r}")
    if not isinstance(self.layer_types, tuple) or (
        self.layer_types and len(self.layer_types) != self.n_layers) or (
        set(self.layer_types) - set(LAYER_TYPES)):
      raise ValueError(f"layer_types must be () or a tuple of {self.n_layers} of {LAYER_TYPES}, "
                       f"got {self.layer_types!r}")
    if "local" in self.layer_types and self.sliding_window < 1:
      raise ValueError(f"local layers need sliding_window >= 1, got {self.sliding_window}")
    if self.query_pre_attn_scalar < 0 or self.final_logit_softcap < 0:
      raise ValueError("query_pre_attn_scalar and final_logit_softcap must be >= 0 (0: off)")

  def is_local(self, layer: int) -> bool:
    """Whether `layer` attends within the sliding window (local RoPE base, no scaling)."""
    return bool(self.layer_types) and self.layer_types[layer] == "local"

  @property
  def query_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  @property
  def compute_dtype(self) -> Any:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> Any:
    return jnp.dtype(self.param_dtype)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
    norms = (4 if self.post_norms else 2) * self.d_model + (2 * self.head_dim if self.qk_norm else 0)
    layer = attn + 3 * self.d_model * self.mlp_dim + norms
    emb = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
    return self.n_layers * layer + emb + self.d_model

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B convention.

    6 x the parameters used in matmuls (layers and output head; an embedding
    lookup is not a matmul) + 12 x seq_len x heads x head_dim per layer for
    attention scores and values (full, not halved for causality; a local layer
    counts min(seq_len, sliding_window) keys).
    """
    attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
    matmul_params = self.n_layers * (attn + 3 * self.d_model * self.mlp_dim)
    matmul_params += self.vocab_size * self.d_model
    keys = sum(min(seq_len, self.sliding_window) if self.is_local(i) else seq_len
               for i in range(self.n_layers))
    return 6.0 * matmul_params + 12.0 * keys * self.n_heads * self.head_dim

  # Presets -------------------------------------------------------------------

  @classmethod
  def tiny(cls) -> "ModelConfig":
    """For tests: compiles in seconds."""
    return cls(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
               head_dim=16, mlp_dim=128, qk_norm=True, max_seq_len=256)

  @classmethod
  def mini(cls) -> "ModelConfig":
    """CPU experiments with pair prompts (about 400 tokens): 0.4M parameters past the embedding."""
    return cls(vocab_size=2000, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
               head_dim=32, mlp_dim=384, qk_norm=True, max_seq_len=512)

  @classmethod
  def small(cls) -> "ModelConfig":
    """The CPU demo: a 5.2M-parameter Qwen3-shaped model."""
    return cls(vocab_size=8000, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
               head_dim=64, mlp_dim=768, rope_base=1_000_000.0, qk_norm=True,
               max_seq_len=1024)

  @classmethod
  def qwen3_0_6b(cls) -> "ModelConfig":
    return cls(vocab_size=151_936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8,
               head_dim=128, mlp_dim=3072, rope_base=1_000_000.0, qk_norm=True,
               tie_embeddings=True, max_seq_len=40_960, scan_layers=True)

  @classmethod
  def qwen3_1_7b(cls) -> "ModelConfig":
    return cls(vocab_size=151_936, d_model=2048, n_layers=28, n_heads=16, n_kv_heads=8,
               head_dim=128, mlp_dim=6144, rope_base=1_000_000.0, qk_norm=True,
               tie_embeddings=True, max_seq_len=40_960, scan_layers=True)

  @classmethod
  def qwen3_4b(cls) -> "ModelConfig":
    return cls(vocab_size=151_936, d_model=2560, n_layers=36, n_heads=32, n_kv_heads=8,
               head_dim=128, mlp_dim=9728, rope_base=1_000_000.0, qk_norm=True,
               tie_embeddings=True, max_seq_len=40_960, scan_layers=True)

  @classmethod
  def qwen3_8b(cls) -> "ModelConfig":
    return cls(vocab_size=151_936, d_model=4096, n_layers=36, n_heads=32, n_kv_heads=8,
               head_dim=128, mlp_dim=12288, rope_base=1_000_000.0, qk_norm=True,
               tie_embeddings=False, max_seq_len=40_960, scan_layers=True)

  @classmethod
  def llama3_8b(cls) -> "ModelConfig":
    return cls(vocab_size=128_256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
               head_dim=128, mlp_dim=14336, rope_base=500_000.0,
               rope_scaling=RopeScaling(), qk_norm=False, tie_embeddings=False,
               norm_eps=1e-5, max_seq_len=131_072, scan_layers=True)

  # Gemma 3 (google/gemma-3-*): transformers' convert_gemma3_weights.py variants and the
  # published config.json. 4b / 12b / 27b are the text part of the multimodal checkpoints,
  # whose embedding has 64 rows past the 262,144-token vocabulary (262,208).

  @classmethod
  def _gemma3(cls, *, vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim,
              query_pre_attn_scalar, sliding_window, rope_scaling, max_seq_len) -> "ModelConfig":
    """Five local layers, then one global, repeated; the features every size shares."""
    return cls(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
               n_kv_heads=n_kv_heads, head_dim=head_dim, mlp_dim=4 * d_model,
               rope_base=1_000_000.0, rope_scaling=rope_scaling, qk_norm=True,
               tie_embeddings=True, norm_eps=1e-6, max_seq_len=max_seq_len,
               mlp_activation="gelu_tanh", norm_unit_offset=True, post_norms=True,
               embed_scale=True, query_pre_attn_scalar=query_pre_attn_scalar,
               layer_types=tuple("global" if (i + 1) % 6 == 0 else "local"
                                 for i in range(n_layers)),
               sliding_window=sliding_window, rope_local_base=10_000.0, scan_layers=True)

  @classmethod
  def gemma3_1b(cls) -> "ModelConfig":
    return cls._gemma3(vocab_size=262_144, d_model=1152, n_layers=26, n_heads=4, n_kv_heads=1,
                       head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                       rope_scaling=None, max_seq_len=32_768).replace(mlp_dim=6912)

  @classmethod
  def gemma3_4b(cls) -> "ModelConfig":
    return cls._gemma3(vocab_size=262_208, d_model=2560, n_layers=34, n_heads=8, n_kv_heads=4,
                       head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
                       rope_scaling=_GEMMA3_GLOBAL_ROPE, max_seq_len=131_072)

  @classmethod
  def gemma3_12b(cls) -> "ModelConfig":
    return cls._gemma3(vocab_size=262_208, d_model=3840, n_layers=48, n_heads=16, n_kv_heads=8,
                       head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
                       rope_scaling=_GEMMA3_GLOBAL_ROPE, max_seq_len=131_072)

  @classmethod
  def gemma3_27b(cls) -> "ModelConfig":
    # query_pre_attn_scalar = d_model / n_heads (168), not head_dim (128).
    return cls._gemma3(vocab_size=262_208, d_model=5376, n_layers=62, n_heads=32, n_kv_heads=16,
                       head_dim=128, query_pre_attn_scalar=168, sliding_window=1024,
                       rope_scaling=_GEMMA3_GLOBAL_ROPE, max_seq_len=131_072)


# Gemma 3 4b / 12b / 27b: positions / 8 on the global layers (128K context).
_GEMMA3_GLOBAL_ROPE = RopeScaling(factor=8.0, rope_type="linear")


# Run sections: one dataclass per config section, fields = the section's keys. --------

class ConfigError(ValueError):
  """A bad config key or value; the message names the key and what it may be.

  The launcher prints it as one line (launch/main.py); RunConfig.from_config turns
  every section's ValueError / TypeError / KeyError into one, before any work.
  """


def _require(ok: bool, key: str, allowed: str, got) -> None:
  if not ok:
    raise ConfigError(f"config.{key}={got!r}: must be {allowed}")


def _section(cls, section, **built):
  """cls(**section) with nested sections passed in `built`; a key cls lacks, or a
  field the section lacks, is a ConfigError naming both sets."""
  d = dict(section)
  d.update(built)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown, missing = sorted(set(d) - names), sorted(names - set(d))
  if unknown:
    raise ConfigError(f"{cls.__name__}: config keys {unknown} are not fields "
                      f"(the fields: {sorted(names)})")
  if missing:
    raise ConfigError(f"{cls.__name__}: fields {missing} have no config key (declare them "
                      "in configs/)")
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _check_kinds(key: str, kinds) -> None:
  """A tuple of known example kinds ("a,b" on the command line is one unknown kind)."""
  if not isinstance(kinds, tuple) or not kinds or set(kinds) - set(KINDS):
    raise ValueError(f"{key} must be a non-empty tuple of example kinds {KINDS}, got {kinds!r}; "
                     f"on the command line: --config.{key}=\"('question','natural_pair')\"")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int  # -1: all devices the other axes leave
  fsdp: int
  tensor: int
  host_devices: int  # > 0: a CPU host split into this many JAX devices (launch/main.py)
  multihost: bool  # jax.distributed.initialize() before anything else (launch/main.py)
  coordinator_address: str  # "host:port" of process 0; "": the environment's (sharding.py)
  num_processes: int  # -1: the environment's
  process_id: int  # -1: the environment's

  def __post_init__(self):
    axes = {"mesh.data": self.data, "mesh.fsdp": self.fsdp, "mesh.tensor": self.tensor}
    for key, size in axes.items():
      _require(size == -1 or size >= 1, key, "-1 (all devices the other axes leave) or >= 1",
               size)
    _require(list(axes.values()).count(-1) <= 1, "mesh.data/fsdp/tensor",
             "at most one -1", tuple(axes.values()))
    _require(self.host_devices >= 0, "mesh.host_devices",
             "0 (XLA's own) or the number of JAX devices to split a CPU host into",
             self.host_devices)
    host, _, port = self.coordinator_address.rpartition(":")
    _require(not self.coordinator_address or (host and port.isdigit()),
             "mesh.coordinator_address", "'' (from the environment) or 'host:port'",
             self.coordinator_address)
    _require(self.num_processes == -1 or self.num_processes >= 1, "mesh.num_processes",
             "-1 (from the environment) or >= 1", self.num_processes)
    top = self.num_processes - 1 if self.num_processes >= 1 else "num_processes - 1"
    _require(self.process_id == -1 or 0 <= self.process_id <= (
        self.num_processes - 1 if self.num_processes >= 1 else self.process_id),
             "mesh.process_id", f"-1 (from the environment) or in [0, {top}]", self.process_id)

  @classmethod
  def from_config(cls, section) -> "MeshConfig":
    return _section(cls, section)


@dataclasses.dataclass(frozen=True)
class ModelSection:
  """`config.model`: which model, in which numerics (the shape is `ModelConfig`)."""
  preset: str  # a ModelConfig classmethod, when hf_checkpoint is ""
  dtype: str
  param_dtype: str
  remat: bool
  scan_layers: bool | None  # None: the preset's choice (a checkpoint's: by its depth)
  hf_checkpoint: str  # a Hugging Face folder (config.json + *.safetensors) to start from


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float
  warmup_steps: int
  total_steps: int
  end_lr_ratio: float
  weight_decay: float
  b1: float
  b2: float
  eps: float
  grad_clip_norm: float  # <= 0 disables clipping
  grad_accum_steps: int  # read by the trainer (lax.scan), not by optax

  def __post_init__(self):
    if self.learning_rate <= 0:
      raise ValueError(f"OptimizerConfig.learning_rate must be > 0, got {self.learning_rate}")
    if self.total_steps < 1:
      raise ValueError(f"OptimizerConfig.total_steps must be >= 1, got {self.total_steps}")
    if not 0 <= self.warmup_steps <= self.total_steps:
      raise ValueError(
          f"OptimizerConfig.warmup_steps must be in [0, total_steps={self.total_steps}], "
          f"got {self.warmup_steps}")
    if not 0.0 <= self.end_lr_ratio <= 1.0:
      raise ValueError(f"OptimizerConfig.end_lr_ratio must be in [0, 1], got {self.end_lr_ratio}")
    if self.grad_accum_steps < 1:
      raise ValueError(f"OptimizerConfig.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")

  @classmethod
  def for_run(cls, section, steps: int, *, updates_per_step: int = 1) -> "OptimizerConfig":
    """The section's optimizer over a run of `steps` steps of `updates_per_step` updates each.

    The schedule counts optimizer updates: total_steps = steps * updates_per_step,
    and the section's warm-up (in steps) is scaled alike; it leaves a decay phase.
    """
    total = steps * updates_per_step
    d = dict(section)
    d["total_steps"] = total
    d["warmup_steps"] = min(d["warmup_steps"] * updates_per_step, total - 1)
    return _section(cls, d)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """What the training loop (loop.py) needs: length, checkpoint grid, logging, resume."""
  steps: int
  checkpoint_every: int
  keep_checkpoints: int
  log_every: int
  resume: bool

  @classmethod
  def of(cls, section) -> "LoopConfig":
    return cls(**{f.name: section[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  loop: LoopConfig
  global_batch_size: int
  kinds: tuple[str, ...]  # example kinds of the train split
  optimizer: OptimizerConfig
  traces: tuple[str, ...]  # trace JSON-lines files joined into completions (traces.augment)
  trace_order: str  # "reasoning_first" | "decision_first"
  imagined: tuple[str, ...]  # imagined_step example files added to the train split

  def __post_init__(self):
    _check_kinds("sft.kinds", self.kinds)
    for key in ("traces", "imagined"):
      paths = getattr(self, key)
      if not isinstance(paths, tuple) or not all(isinstance(p, str) and p for p in paths):
        raise ValueError(f"sft.{key} must be a tuple of file paths, got {paths!r}; on the "
                         f"command line: --config.sft.{key}=\"('runs/traces/traces.jsonl',)\"")
      missing = [p for p in paths if not os.path.isfile(p)]
      if missing:
        raise ValueError(f"sft.{key}: no such file {missing[0]!r}")
    if self.trace_order not in ("reasoning_first", "decision_first"):
      raise ValueError("sft.trace_order must be 'reasoning_first' or 'decision_first', got "
                       f"{self.trace_order!r}")

  @classmethod
  def from_config(cls, section) -> "SFTConfig":
    loop = LoopConfig.of(section)
    d = {k: v for k, v in dict(section).items() if k not in LoopConfig.__dataclass_fields__}
    return _section(cls, d, loop=loop,
                    optimizer=OptimizerConfig.for_run(section.optimizer, loop.steps))


@dataclasses.dataclass(frozen=True)
class RLConfig:
  loop: LoopConfig
  splits: tuple[str, ...]  # prompt source splits
  kinds: tuple[str, ...]
  prompts_per_step: int  # distinct prompts; prompts_per_step * group_size sequences
  group_size: int
  max_new_tokens: int
  temperature: float  # > 0: the trainer needs the log-probs of the distribution sampled
  top_k: int  # must be 0 (off): see __post_init__
  top_p: float  # must be 1.0 (off)
  eps_low: float
  eps_high: float
  beta: float  # KL to the reference; 0 skips the reference forward
  aggregation: str  # grpo.AGGREGATIONS: "token" | "sequence"
  advantage_scale: str  # grpo.ADVANTAGE_SCALES: "batch_std" | "none" (why: grpo.py)
  updates_per_rollout: int  # optimizer updates on each rollout batch (GRPO's mu)
  recompute_old_logprobs: bool
  reward_weights: tuple[tuple[str, float], ...]
  cache_dtype: str
  optimizer: OptimizerConfig  # its schedule spans loop.steps * updates_per_rollout updates

  def __post_init__(self):
    if self.aggregation not in grpo.AGGREGATIONS:
      raise ValueError(f"rl.aggregation must be one of {grpo.AGGREGATIONS}, "
                       f"got {self.aggregation!r}")
    if self.advantage_scale not in grpo.ADVANTAGE_SCALES:
      raise ValueError(f"rl.advantage_scale must be one of {grpo.ADVANTAGE_SCALES}, "
                       f"got {self.advantage_scale!r}")
    if not self.temperature > 0:
      raise ValueError(f"rl.temperature must be > 0, got {self.temperature}: GRPO needs "
                       "sampled completions and their log-probs; greedy decoding has neither")
    if self.top_k != 0 or self.top_p != 1.0:
      raise ValueError(
          f"rl.top_k={self.top_k} / rl.top_p={self.top_p}: RL refuses truncated sampling. The "
          "trainer's ratio and KL use softmax(logits / temperature) over the whole vocabulary; "
          "tokens drawn from a top-k / top-p distribution would be scored under another one. "
          "Set rl.top_k=0 and rl.top_p=1.0")
    if self.updates_per_rollout < 1:
      raise ValueError(f"rl.updates_per_rollout must be >= 1, got {self.updates_per_rollout}")
    updates = self.loop.steps * self.updates_per_rollout
    if self.optimizer.total_steps != updates:
      raise ValueError(
          f"rl.optimizer: the schedule spans {self.optimizer.total_steps} updates but the run "
          f"makes rl.steps * rl.updates_per_rollout = {updates} (OptimizerConfig.for_run with "
          "updates_per_step sizes it)")
    if self.optimizer.grad_accum_steps != 1:
      raise ValueError(f"rl.optimizer.grad_accum_steps must be 1 (the GRPO update does not "
                       f"accumulate), got {self.optimizer.grad_accum_steps}")
    _check_kinds("rl.kinds", self.kinds)
    for name, _ in self.reward_weights:
      rewards.get_reward(name)  # an unknown reward name fails at start-up

  @classmethod
  def from_config(cls, section) -> "RLConfig":
    loop = LoopConfig.of(section)
    d = {k: v for k, v in dict(section).items() if k not in LoopConfig.__dataclass_fields__}
    d["reward_weights"] = tuple((str(k), float(w)) for k, w in d["reward_weights"])
    optimizer = OptimizerConfig.for_run(section.optimizer, loop.steps,
                                        updates_per_step=section.updates_per_rollout)
    return _section(cls, d, loop=loop, optimizer=optimizer)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  mode: str  # "score": option probabilities from logits; "sample": `runs` sampled answers
  runs: int
  temperature: float
  max_new_tokens: int
  batch_size: int
  max_questions: int  # 0 = all
  imagining: bool
  imagining_k: int
  aggregate: str  # how the k anchors' final distributions combine: mean | geometric
  walk: str  # what a walk carries: decision | per_arm (eval/imagining.py)
  baselines: bool
  rf_seeds: tuple[int, ...]
  cv_folds: int  # baselines choose hyper-parameters by this many folds on the training split
  pair_eval: bool
  max_pairs: int  # pairs the model scores, evenly spread (0 = all)
  checkpoint: str  # a finished run's workdir whose exported policy is evaluated (eval job)
  traces: tuple[str, ...]  # trace files shown beside each answer in the report's pages

  def __post_init__(self):
    missing = [t for t in self.traces if not os.path.isfile(t)]
    if missing:
      raise ValueError(f"eval.traces: no such file(s) {missing}")
    if self.mode not in ("score", "sample"):
      raise ValueError(f"eval.mode must be 'score' or 'sample', got {self.mode!r}")
    if self.cv_folds < 2:
      raise ValueError(f"eval.cv_folds must be >= 2, got {self.cv_folds}")
    if self.walk not in ("decision", "per_arm"):
      raise ValueError(f"eval.walk must be 'decision' or 'per_arm', got {self.walk!r}")

  @classmethod
  def from_config(cls, section) -> "EvalConfig":
    return _section(cls, section)


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the linear projections
LORA_ROUTES = ("active", "factor")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Low-rank adapters on the base's linear projections (lora.py); rank 0: none (full training).

  An update is `scale * (dropout(x) @ A) @ B` with scale = alpha / rank, as in PEFT;
  `adapters` names several on one base (one per factor), chosen per example by `route`
  (lora.route): "active", every example uses adapters[0]; "factor", an example whose
  perturbation is one factor named in `adapters` uses that factor's adapter (the method's
  local operator), every other one (questions, several factors) adapters[0], the general
  one. The SFT job counts examples per adapter (sft_adapters.json).
  """
  rank: int
  alpha: float
  dropout: float  # on the adapter's input, in training only
  targets: tuple[str, ...]  # of LORA_TARGETS
  adapters: tuple[str, ...]  # adapter names; index i is adapter i of every projection
  route: str  # "active" | "factor": which adapter an example trains and is scored with

  def __post_init__(self):
    _require(isinstance(self.rank, int) and self.rank >= 0, "lora.rank",
             "an integer >= 0 (0: no adapters, the whole model trains)", self.rank)
    if self.rank == 0:
      return
    _require(self.alpha > 0, "lora.alpha", "a number > 0", self.alpha)
    _require(0.0 <= self.dropout < 1.0, "lora.dropout", "a number in [0, 1)", self.dropout)
    _require(isinstance(self.targets, tuple) and bool(self.targets)
             and set(self.targets) <= set(LORA_TARGETS) and len(set(self.targets)) == len(
                 self.targets), "lora.targets", f"a non-empty tuple of distinct {LORA_TARGETS}",
             self.targets)
    _require(isinstance(self.adapters, tuple) and bool(self.adapters)
             and all(isinstance(a, str) and a for a in self.adapters)
             and len(set(self.adapters)) == len(self.adapters), "lora.adapters",
             "a non-empty tuple of distinct names, e.g. ('default',)", self.adapters)
    _require(self.route in LORA_ROUTES, "lora.route", f"one of {LORA_ROUTES}", self.route)
    if self.route == "factor":
      _require(len(self.adapters) > 1 and set(self.adapters[1:]) <= set(FACTORS)
               and self.adapters[0] not in FACTORS, "lora.adapters",
               f"with lora.route 'factor': a general adapter first, then factor names of "
               f"{FACTORS}, e.g. ('general', 'dose', 'outcome')", self.adapters)

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A whole job config, typed once (jobs.py); a section the job's config lacks is None."""
  job: str
  workdir: str
  seed: int
  data: DataConfig
  model: ModelSection | None
  mesh: MeshConfig | None
  sft: SFTConfig | None
  rl: RLConfig | None
  eval: EvalConfig | None
  lora: LoRAConfig | None

  def __post_init__(self):
    """Values that depend on each other, or on the machine, checked before any work."""
    d = self.data
    _require(d.seq_len >= 2, "data.seq_len", "an integer >= 2", d.seq_len)
    if self.rl is not None or self.eval is not None:  # the jobs that read prompt_len
      _require(1 <= d.prompt_len <= d.seq_len, "data.prompt_len",
               f"an integer in [1, data.seq_len={d.seq_len}]", d.prompt_len)
    if self.eval is not None and self.eval.imagining:
      _require(1 <= self.eval.imagining_k <= d.anchors_k, "eval.imagining_k",
               f"an integer in [1, data.anchors_k={d.anchors_k}]", self.eval.imagining_k)
    _require(not d.root or os.path.isdir(os.path.expanduser(d.root)), "data.root",
             "'' (the default places) or an existing folder", d.root)
    if self.model is not None:
      m = self.model
      if m.hf_checkpoint:
        _require(os.path.isfile(os.path.join(m.hf_checkpoint, "config.json")),
                 "model.hf_checkpoint", "'' or a folder holding config.json", m.hf_checkpoint)
      else:
        presets = tuple(sorted(n for n, v in vars(ModelConfig).items()
                               if isinstance(v, classmethod) and not n.startswith("_")))
        _require(m.preset in presets, "model.preset", f"one of {presets}", m.preset)
      for key in ("dtype", "param_dtype"):
        _require(getattr(m, key) in _DTYPES, f"model.{key}", f"one of {_DTYPES}", getattr(m, key))
    if self.sft is not None:
      _check_loop("sft", self.sft.loop)
      _require(self.sft.global_batch_size >= 1, "sft.global_batch_size", "an integer >= 1",
               self.sft.global_batch_size)
    if self.rl is not None:
      r = self.rl
      _check_loop("rl", r.loop)
      _require(r.prompts_per_step >= 1, "rl.prompts_per_step", "an integer >= 1",
               r.prompts_per_step)
      _require(r.group_size >= 2, "rl.group_size",
               "an integer >= 2 (GRPO's advantage compares the samples of a prompt)", r.group_size)
      _require(r.max_new_tokens >= 1, "rl.max_new_tokens", "an integer >= 1", r.max_new_tokens)
      _require(r.beta >= 0, "rl.beta", "a number >= 0 (0: no KL term)", r.beta)
      _require(0 <= r.eps_low < 1, "rl.eps_low", "a number in [0, 1)", r.eps_low)
      _require(r.eps_high >= 0, "rl.eps_high", "a number >= 0", r.eps_high)
      _require(r.cache_dtype in _DTYPES, "rl.cache_dtype", f"one of {_DTYPES}", r.cache_dtype)
      _require(bool(r.splits) and all(isinstance(x, str) and x for x in r.splits), "rl.splits",
               "a non-empty tuple of split names, e.g. ('rl',)", r.splits)

  @classmethod
  def from_config(cls, config) -> "RunConfig":
    """Types the whole config; any bad key or value is one ConfigError naming it."""
    for name in ("sft", "rl"):  # read raw: the optimizer's schedule is sized from them
      if name in config:
        _require(isinstance(config[name].steps, int) and config[name].steps >= 1,
                 f"{name}.steps", "an integer >= 1", config[name].steps)
    if "rl" in config:
      _require(config.rl.updates_per_rollout >= 1, "rl.updates_per_rollout", "an integer >= 1",
               config.rl.updates_per_rollout)
      weights = config.rl.reward_weights
      pairs_ok = isinstance(weights, (tuple, list)) and bool(weights) and all(
          isinstance(p, (tuple, list)) and len(p) == 2 and p[0] in rewards.REWARDS
          and isinstance(p[1], (int, float)) and not isinstance(p[1], bool) for p in weights)
      _require(pairs_ok, "rl.reward_weights",
               f"a non-empty tuple of (name, weight) pairs, names from {sorted(rewards.REWARDS)}, "
               "e.g. \"(('correctness', 1.0), ('format', 0.1))\"", weights)
    builders = {"data": lambda s: _section(DataConfig, s),
                "model": lambda s: _section(ModelSection, s),
                "mesh": MeshConfig.from_config, "sft": SFTConfig.from_config,
                "rl": RLConfig.from_config, "eval": EvalConfig.from_config,
                "lora": lambda s: _section(LoRAConfig, s)}
    sections = {}
    for name, build in builders.items():
      if name not in config:
        _require(name != "data", "data", "a section (configs/common.py data())", None)
        sections[name] = None
        continue
      try:
        sections[name] = build(config[name])
      except (ValueError, TypeError, KeyError) as e:  # ConfigError too: say which section
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        if msg.startswith(f"{name}."):
          msg = f"config.{msg}"
        raise ConfigError(msg if msg.startswith("config.") else f"config.{name}: {msg}") from e
    return cls(job=config.job, workdir=config.workdir, seed=config.seed, **sections)


_DTYPES = ("float32", "bfloat16")


def _check_loop(name: str, loop: LoopConfig) -> None:
  for key, allowed in (("steps", 1), ("checkpoint_every", 1), ("keep_checkpoints", 1),
                       ("log_every", 1)):
    _require(getattr(loop, key) >= allowed, f"{name}.{key}", f"an integer >= {allowed}",
             getattr(loop, key))
