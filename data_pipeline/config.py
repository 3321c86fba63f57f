"""The data section of the config as a frozen dataclass (built once, in deepimagine_jax/jobs.py).

Fields are exactly the keys of `configs/common.py` `data()`, with no defaults of
their own: `DataConfig(**config.data)`.
"""
from __future__ import annotations

import dataclasses

from data_pipeline.example import SOURCES
from data_pipeline.facts import FACTORS
from data_pipeline.retrieval import RETRIEVERS


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
  max_anchors: int  # natural (same-trial, training-only) pairs per target and perturbation type
  anchors_k: int  # retrieved anchors per target (other trials, public before its cutoff)
  retriever: str  # one of retrieval.RETRIEVERS
  embed_max_len: int  # dense retriever: tokens per embedded text (jobs.py builds the encoder)
  embed_batch_size: int  # dense retriever: texts per forward
  factor_order: tuple[str, ...]  # a permutation of facts.FACTORS: the walk's step order
  # the paper's trial filter, applied to registry trials (ctgov_xml, ctgov_json) in the build
  registry_randomised: bool  # keep randomised trials only
  registry_min_enrollment: int  # keep trials enrolling at least this many (0: any, unknown too)
  registry_results_posted: bool  # keep trials with a results-first-posted date only
  registry_eval_fraction: float  # no CT Open eval release: the latest-posted registry share
  tfds: bool  # also write a TFDS (ArrayRecord) copy of the examples

  def __post_init__(self):
    if not isinstance(self.sources, tuple) or not all(isinstance(s, str) for s in self.sources):
      raise ValueError(f"data.sources: expected a tuple of source names, got "
                       f"{type(self.sources).__name__} {self.sources!r}")
    bad = [s for s in self.sources if s not in SOURCES]
    if bad:
      raise ValueError(f"data.sources: unknown source(s) {bad}; known: {list(SOURCES)}")
    if (not isinstance(self.factor_order, tuple)
        or sorted(self.factor_order) != sorted(FACTORS)):
      raise ValueError(f"data.factor_order: expected a tuple holding each of {list(FACTORS)} "
                       f"once, got {self.factor_order!r}")
    if self.retriever not in RETRIEVERS:
      raise ValueError(f"data.retriever: {self.retriever!r} is not one of {list(RETRIEVERS)}")
    if not isinstance(self.registry_min_enrollment, int) or self.registry_min_enrollment < 0:
      raise ValueError(f"data.registry_min_enrollment: expected an int >= 0, got "
                       f"{self.registry_min_enrollment!r}")
    if not 0 <= self.registry_eval_fraction < 1:
      raise ValueError(f"data.registry_eval_fraction: expected a share in [0, 1), got "
                       f"{self.registry_eval_fraction!r}")
    if self.anchors_k < 1:
      raise ValueError(f"data.anchors_k: need at least 1 anchor per target, got {self.anchors_k}")
