"""Training metrics: JSON lines (the record reports read), TensorBoard, a progress/ETA line.

`workdir/metrics.jsonl` holds one object per written step: {"step", "time", **metrics}.
A resumed run passes `start_step` (the first step it will write): lines with
step >= start_step are dropped on open, so a run restarted from a checkpoint never
leaves duplicate or stale steps behind, and TensorBoard is told to purge them too.
Only JAX process 0 writes files.
"""
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Iterable, Mapping

import jax
import numpy as np
from absl import logging

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


class NonFiniteLossError(FloatingPointError):
  """Raised when a training metric is NaN/Inf; the trainer stops without saving."""


def _to_float(name: str, v) -> float:
  arr = np.asarray(v)
  if arr.size != 1 or not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
    raise TypeError(f"metric {name!r} must be a numeric scalar, got {type(v).__name__} {arr.shape} {arr.dtype}")
  return float(arr.reshape(()))


def check_finite(step: int, metrics: Mapping[str, float], keys: Iterable[str] | None = None):
  """Raises NonFiniteLossError naming the step and each NaN/Inf metric (all keys by default).

  The trainers call this on step N-1's metrics after dispatching step N (async dispatch).
  """
  names = list(metrics) if keys is None else list(keys)
  bad = []
  for k in names:
    if k not in metrics:
      raise KeyError(f"check_finite: metric {k!r} missing at step {step} (have {sorted(metrics)})")
    x = _to_float(k, metrics[k])
    if not math.isfinite(x):
      bad.append(f"{k}={x}")
  if bad:
    raise NonFiniteLossError(f"non-finite metrics at step {step}: {', '.join(bad)}")


def format_duration(seconds: float) -> str:
  """Compact h/m/s: 42s, 1m54s, 2h03m, 3d04h; '?' when unknown."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return "?"
  s = int(round(seconds))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  if s < 86400:
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"
  return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def _fmt(v: float) -> str:
  return f"{v:.4g}"


def read_metrics(path) -> list[dict]:
  """All records of a metrics.jsonl; unreadable lines (a crash mid-write) are skipped and logged."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / METRICS_FILE
  out = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        logging.warning("%s line %d: not JSON (%s); skipped", path, lineno, e)
        continue
      if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
        logging.warning("%s line %d: no integer 'step'; skipped", path, lineno)
        continue
      out.append(rec)
  return out


class MetricsWriter:
  """Appends metrics to workdir/metrics.jsonl and TensorBoard; logs a progress line every `log_every` steps."""

  def __init__(self, workdir, total_steps: int, *, start_step: int = 0, log_every: int = 10,
               clock: Callable[[], float] = time.monotonic):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / METRICS_FILE
    self.total_steps = int(total_steps)
    self.log_every = max(int(log_every), 1)
    self._clock = clock
    self._last_t = clock()
    self._last_step = int(start_step)
    self._s_per_step = None
    self._is_writer = jax.process_index() == 0
    self._file = None
    self._tb = None
    if self._is_writer:
      self.workdir.mkdir(parents=True, exist_ok=True)
      self._truncate_from(int(start_step))
      self._file = open(self.path, "a", encoding="utf-8")
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(logdir=str(self.workdir / TB_DIR),
                               purge_step=int(start_step) if start_step > 0 else None)

  def _truncate_from(self, start_step: int):
    """Keeps only well-formed records with step < start_step (atomic rewrite)."""
    if not self.path.exists():
      return
    keep = [r for r in read_metrics(self.path) if r["step"] < start_step]
    tmp = self.path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      for r in keep:
        f.write(json.dumps(r) + "\n")
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: Mapping[str, float]):
    step = int(step)
    values = {k: _to_float(k, v) for k, v in metrics.items()}
    if self._is_writer:
      self._file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
      self._file.flush()
      for k, v in values.items():
        self._tb.add_scalar(k, v, global_step=step)
    if step % self.log_every == 0 or step == self.total_steps:
      logging.info("%s", self.progress_line(step, values))

  def progress_line(self, step: int, metrics: Mapping[str, float]) -> str:
    """'step 12/100 (12.0%) loss 2.345 | 1.30 s/step ETA 1m54s', timed since the previous call."""
    now = self._clock()
    if step > self._last_step and now > self._last_t:
      self._s_per_step = (now - self._last_t) / (step - self._last_step)
      self._last_t, self._last_step = now, step
    pct = 100.0 * step / self.total_steps if self.total_steps else 0.0
    parts = [f"step {step}/{self.total_steps} ({pct:.1f}%)"]
    parts += [f"{k} {_fmt(_to_float(k, v))}" for k, v in metrics.items()]
    line = " ".join(parts)
    if self._s_per_step is not None:
      eta = self._s_per_step * max(self.total_steps - step, 0)
      line += f" | {self._s_per_step:.2f} s/step ETA {format_duration(eta)}"
    return line

  def flush(self):
    if self._is_writer:
      self._file.flush()
      self._tb.flush()

  def close(self):
    if self._is_writer and self._file is not None:
      self._file.close()
      self._tb.close()
      self._file = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
