"""The model's shape and numerics as a frozen dataclass, with named presets."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 style frequency-dependent RoPE scaling."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama / Qwen family decoder."""
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_base: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  qk_norm: bool = False
  tie_embeddings: bool = True
  norm_eps: float = 1e-6
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype of activations and matmuls
  remat: bool = False  # jax.checkpoint each layer
  max_seq_len: int = 2048

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in ("float32", "bfloat16"):
        raise ValueError(f"{name} must be float32 or bfloat16, got {getattr(self, name)!r}")

  @property
  def compute_dtype(self) -> Any:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> Any:
    return jnp.dtype(self.param_dtype)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_dict(cls, d: dict) -> "ModelConfig":
    """Builds from a config dict: `preset` picks a classmethod, other keys override it."""
    d = dict(d)
    preset = d.pop("preset", None)
    if isinstance(d.get("rope_scaling"), dict):
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    if preset:
      return getattr(cls, preset)().replace(**d)
    return cls(**d)

  def num_params(self) -> int:
    attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
    norms = 2 * self.d_model + (2 * self.head_dim if self.qk_norm else 0)
    layer = attn + 3 * self.d_model * self.mlp_dim + norms
    emb = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
    return self.n_layers * layer + emb + self.d_model

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B convention.

    6 x the parameters used in matmuls (layers and output head; an embedding
    lookup is not a matmul) + 12 x layers x seq_len x heads x head_dim for
    attention scores and values (full, not halved for causality).
    """
    attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
    matmul_params = self.n_layers * (attn + 3 * self.d_model * self.mlp_dim)
    matmul_params += self.vocab_size * self.d_model
    return 6.0 * matmul_params + 12.0 * self.n_layers * seq_len * self.n_heads * self.head_dim

  # Presets -------------------------------------------------------------------

  @classmethod
  def tiny(cls) -> "ModelConfig":
    """For tests: compiles in seconds."""
    return cls(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
               head_dim=16, mlp_dim=128, qk_norm=True, max_seq_len=256)

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
               tie_embeddings=True, max_seq_len=40_960)

  @classmethod
  def qwen3_1_7b(cls) -> "ModelConfig":
    return cls(vocab_size=151_936, d_model=2048, n_layers=28, n_heads=16, n_kv_heads=8,
               head_dim=128, mlp_dim=6144, rope_base=1_000_000.0, qk_norm=True,
               tie_embeddings=True, max_seq_len=40_960)

  @classmethod
  def qwen3_4b(cls) -> "ModelConfig":
    return cls(vocab_size=151_936, d_model=2560, n_layers=36, n_heads=32, n_kv_heads=8,
               head_dim=128, mlp_dim=9728, rope_base=1_000_000.0, qk_norm=True,
               tie_embeddings=True, max_seq_len=40_960)

  @classmethod
  def qwen3_8b(cls) -> "ModelConfig":
    return cls(vocab_size=151_936, d_model=4096, n_layers=36, n_heads=32, n_kv_heads=8,
               head_dim=128, mlp_dim=12288, rope_base=1_000_000.0, qk_norm=True,
               tie_embeddings=False, max_seq_len=40_960)

  @classmethod
  def llama3_8b(cls) -> "ModelConfig":
    return cls(vocab_size=128_256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
               head_dim=128, mlp_dim=14336, rope_base=500_000.0,
               rope_scaling=RopeScaling(), qk_norm=False, tie_embeddings=False,
               norm_eps=1e-5, max_seq_len=131_072)
