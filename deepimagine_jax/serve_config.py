"""Typed sections of the serving and trace jobs (`serve`, `teacher`, `traces`).

Kept apart from config.py so these jobs could be built while the run sections
changed; like them, each is a frozen dataclass with no defaults whose fields are
exactly the section's keys (configs/common.py declares them once).
"""
from __future__ import annotations

import dataclasses

ORDERS = ("reasoning_first", "decision_first")


def typed(cls, section):
  """cls(**section): an unknown key names itself, list values become tuples."""
  d = dict(section)
  unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
  if unknown:
    raise ValueError(f"{cls.__name__}: config keys {unknown} are not fields")
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """`config.serve`: the policy behind an OpenAI-compatible endpoint."""
  checkpoint: str  # a finished run's workdir (its policy/ is served)
  host: str
  port: int
  model_name: str  # the id /v1/models lists and requests name
  dtype: str  # parameter and compute dtype of the loaded policy
  batch_size: int  # most rows per sampler call (requests x n; padded to a power of two)
  batch_wait_ms: float  # how long the first queued request waits for company
  prompt_len: int  # padded prompt length; a longer prompt is refused, never cut
  max_new_tokens: int  # the largest max_tokens a request may ask for
  cache_dtype: str

  def __post_init__(self):
    for key in ("batch_size", "prompt_len", "max_new_tokens"):
      if getattr(self, key) < 1:
        raise ValueError(f"serve.{key} must be >= 1, got {getattr(self, key)}")
    if self.batch_wait_ms < 0:
      raise ValueError(f"serve.batch_wait_ms must be >= 0, got {self.batch_wait_ms}")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  """`config.teacher`: any OpenAI-compatible chat-completions endpoint."""
  base_url: str  # e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
  model: str
  api_key_env: str  # the environment variable holding the key ("" = no key); never stored
  max_concurrency: int
  max_attempts: int  # tries per request, the first included
  backoff_s: float  # first back-off; doubles per retry
  backoff_max_s: float
  timeout_s: float
  temperature: float
  top_p: float
  max_tokens: int
  instruction: str  # appended to each example's prompt on a new line ("": none)

  def __post_init__(self):
    if self.max_concurrency < 1 or self.max_attempts < 1:
      raise ValueError("teacher.max_concurrency and teacher.max_attempts must be >= 1, got "
                       f"{self.max_concurrency}, {self.max_attempts}")


@dataclasses.dataclass(frozen=True)
class TracesConfig:
  """`config.traces`: which examples get traces, where they go, how SFT uses them."""
  source: str  # "teacher" (the endpoint above) | "self" (the policy's own samples)
  splits: tuple[str, ...]
  kinds: tuple[str, ...]
  max_examples: int  # 0 = all
  path: str  # traces JSON lines ("" = <workdir>/traces.jsonl)
  order: str  # completion layout in SFT: reasoning_first | decision_first
  self_checkpoint: str  # source "self": the run whose policy samples
  self_samples: int  # n samples per example
  self_keep: int  # at most m right ones kept per example
  self_temperature: float
  self_max_new_tokens: int
  self_batch: int  # prompts per sampler call

  def __post_init__(self):
    if self.source not in ("teacher", "self"):
      raise ValueError(f"traces.source must be 'teacher' or 'self', got {self.source!r}")
    if self.order not in ORDERS:
      raise ValueError(f"traces.order must be one of {ORDERS}, got {self.order!r}")
    if not isinstance(self.splits, tuple) or not isinstance(self.kinds, tuple):
      raise ValueError("traces.splits and traces.kinds must be tuples, e.g. "
                       "--config.traces.kinds=\"('question',)\"")
    if self.self_samples < 1 or not 1 <= self.self_keep <= self.self_samples:
      raise ValueError(f"traces.self_keep must be in [1, self_samples={self.self_samples}], "
                       f"got {self.self_keep}")
