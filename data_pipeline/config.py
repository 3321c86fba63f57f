"""The data section of the config as a frozen dataclass (built once, in deepimagine_jax/jobs.py).

Fields are exactly the keys of `configs/common.py` `data()`, with no defaults of
their own: `DataConfig(**config.data)`.
"""
from __future__ import annotations

import dataclasses

from data_pipeline.example import SOURCES


@dataclasses.dataclass(frozen=True)
class DataConfig:
  root: str  # "" -> $DEEPIMAGINE_DATA, else ../shared/data, else download CT Open
  build_dir: str  # "" -> <workdir>/data ; reused when its fingerprint matches
  sources: tuple[str, ...]  # a subset of example.SOURCES
  seed: int
  vocab_size: int
  seq_len: int  # SFT sequence length (prompt + completion)
  prompt_len: int  # RL / eval prompt length (left-padded)
  pack: bool
  dev_fraction: float
  rl_fraction: float
  max_anchors: int  # natural / approximate pairs per target
  chain_k: int  # anchors per target for successive imagining
  tfds: bool  # also write a TFDS (ArrayRecord) copy of the examples

  def __post_init__(self):
    if not isinstance(self.sources, tuple) or not all(isinstance(s, str) for s in self.sources):
      raise ValueError(f"data.sources: expected a tuple of source names, got "
                       f"{type(self.sources).__name__} {self.sources!r}")
    bad = [s for s in self.sources if s not in SOURCES]
    if bad:
      raise ValueError(f"data.sources: unknown source(s) {bad}; known: {list(SOURCES)}")
