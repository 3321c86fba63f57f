"""Files written whole or not at all, JSON lines, and JSON-ready values: the one copy
for the project (deepimagine_jax imports it; it lives here because the data
pipeline must not import deepimagine_jax).

`atomic_write` writes beside the target and renames, so a crash leaves the old
file or the new one, never half of either; `swap_in` does the same for a folder.
`to_jsonable` turns numpy scalars and arrays, tuples, dataclasses and paths into plain
JSON values and non-finite floats (NaN, inf) into None, so what is written is
standard JSON that any reader parses.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import os
import pathlib
import secrets
import shutil
import tempfile
import typing
from typing import Any, Iterable

import numpy as np

from data_pipeline.build_report import BuildReport


def to_jsonable(x: Any) -> Any:
  """A JSON-ready copy of `x` (dicts, lists, str, int, float, bool, None)."""
  if x is None or type(x) in _PLAIN:  # the common case first: builds write millions
    return x
  if isinstance(x, dict):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple, set, frozenset)):
    return [v if v is None or type(v) in _PLAIN else to_jsonable(v) for v in x]
  if dataclasses.is_dataclass(x) and not isinstance(x, type):  # as asdict, without its deep copy
    out = {}
    for name in _field_names(type(x)):
      v = getattr(x, name)
      out[name] = v if v is None or type(v) in _PLAIN else to_jsonable(v)
    return out
  if isinstance(x, np.ndarray):
    return to_jsonable(x.tolist())
  if isinstance(x, np.generic):
    return to_jsonable(x.item())
  if isinstance(x, float):
    return x if math.isfinite(x) else None
  if isinstance(x, os.PathLike):
    return os.fspath(x)
  if isinstance(x, (str, int, bool)):  # subclasses (str enums)
    return x
  raise TypeError(f"{type(x).__name__} is not JSON serialisable")


_PLAIN = frozenset((str, int, bool))


@functools.cache
def _field_names(cls) -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(cls))


def dataclass_record(x: Any) -> dict:
  """to_jsonable(x) of a dataclass instance for json.dumps, several times quicker: a field
  declared str, int, bool or a tuple of those is taken as it is (json.dumps writes a tuple
  as a list, so the JSON text is the same), the others go through to_jsonable (a nested
  dataclass, or a tuple of them, through this). Builds write millions of Examples."""
  plain, nested = _record_plan(type(x))
  out = dict(zip(plain, operator.attrgetter(*plain)(x))) if plain else {}
  for name, of_tuple in nested:
    v = getattr(x, name)
    if of_tuple and type(v) is tuple:
      out[name] = [dataclass_record(i) if dataclasses.is_dataclass(i) else to_jsonable(i)
                   for i in v]
    elif dataclasses.is_dataclass(v) and not isinstance(v, type):
      out[name] = dataclass_record(v)
    else:
      out[name] = to_jsonable(v)
  return out


@functools.cache
def _record_plan(cls) -> tuple[tuple[str, ...], tuple[tuple[str, bool], ...]]:
  """(fields of a plain declared type, (other field, declared a tuple)) of a dataclass."""
  hints = typing.get_type_hints(cls)
  plain, nested = [], []
  for name in _field_names(cls):
    tp = hints[name]
    args = typing.get_args(tp)
    is_tuple = typing.get_origin(tp) is tuple
    if tp in (str, int, bool) or (is_tuple and args and args[-1] is Ellipsis
                                  and args[0] in (str, int, bool)):
      plain.append(name)
    else:
      nested.append((name, is_tuple))
  return tuple(plain), tuple(nested)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> pathlib.Path:
  """Writes `data` to a temporary file beside `path`, fsyncs it, then renames it into place."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode("utf-8") if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1,
               sort_keys: bool = False) -> pathlib.Path:
  """One JSON document, written atomically."""
  return atomic_write(path, json.dumps(to_jsonable(obj), indent=indent, sort_keys=sort_keys,
                                       ensure_ascii=False))


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any], *,
                sort_keys: bool = False) -> pathlib.Path:
  """One JSON object per line (UTF-8, not ASCII-escaped), written atomically."""
  with JsonlWriter(path, sort_keys=sort_keys) as w:
    for r in rows:
      w.write(r)
  return w.path


class JsonlWriter:
  """JSON lines written as they come (nothing held) to a temporary file beside `path`,
  fsynced and renamed into place when the `with` block ends; an exception inside it
  removes the temporary file, so `path` is the old file or the whole new one."""

  def __init__(self, path: str | os.PathLike, *, sort_keys: bool = False):
    self.path = pathlib.Path(path)
    self.sort_keys = sort_keys
    self.lines = 0

  def __enter__(self) -> "JsonlWriter":
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.",
                                    suffix=".tmp")
    self.file = os.fdopen(fd, "w", encoding="utf-8", newline="", buffering=1 << 20)
    return self

  def write(self, row: Any) -> None:
    """One value (made JSON-ready by to_jsonable) as one line."""
    self.write_line(json.dumps(to_jsonable(row), ensure_ascii=False, sort_keys=self.sort_keys))

  def write_line(self, line: str) -> None:
    """One line already encoded as JSON (no newline in it)."""
    self.file.write(line)
    self.file.write("\n")
    self.lines += 1

  def __exit__(self, exc_type, exc, tb) -> None:
    try:
      if exc_type is None:
        self.file.flush()
        os.fsync(self.file.fileno())
      self.file.close()
      if exc_type is None:
        os.replace(self.tmp, self.path)
    finally:
      if os.path.exists(self.tmp):
        os.unlink(self.tmp)


def read_jsonl(path: str | os.PathLike, report: BuildReport | None = None,
               source: str = "jsonl") -> list:
  """The values of a JSON-lines file; blank lines are ignored.

  A malformed line raises ValueError naming the file and line, unless a `report`
  is given: then it is counted under (`source`, "bad_json") and skipped.
  """
  out = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError as e:
        if report is None:
          raise ValueError(f"{path}:{line_no}: not JSON ({e})") from e
        report.add_skip(source, "bad_json", f"{path}:{line_no}")
  return out


def staging_prefix(dest: str | os.PathLike) -> str:
  """The name prefix of a staging folder for `dest` (tempfile.mkdtemp(prefix=...)), holding
  the writer's pid so a later run can tell a dead writer's leftovers from a live one's."""
  return f".{pathlib.Path(dest).name}.staging-{os.getpid()}-"


def _writer_alive(name: str) -> bool:
  """Whether the pid in `.x.staging-<pid>-...` / `.x.old-<pid>-...` is a live process."""
  try:
    pid = int(name.rsplit(".", 1)[-1].split("-")[1])
  except (IndexError, ValueError):
    return False  # no pid in the name: an older format, written by a finished run
  if pid == os.getpid():
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # a live process of another user
  return True


def recover_swap(dest: str | os.PathLike) -> list[str]:
  """Repairs what a killed build or swap_in left beside `dest`: when `dest` is missing (a
  kill between swap_in's two renames), the newest `.<name>.old-*` is put back; staging and
  old folders of writers that are no longer running are removed. Returns what it did."""
  dest = pathlib.Path(dest)
  done = []
  if not dest.parent.is_dir():
    return done
  olds = sorted(dest.parent.glob(f".{dest.name}.old-*"), key=lambda p: p.stat().st_mtime)
  if not dest.exists() and olds and not _writer_alive(olds[-1].name):
    os.rename(olds.pop(), dest)
    done.append(f"restored the previous {dest.name} from a swap a kill interrupted")
  for p in olds + sorted(dest.parent.glob(f".{dest.name}.staging-*")):
    if not _writer_alive(p.name):
      shutil.rmtree(p, ignore_errors=True)
      done.append(f"removed {p.name}, left by a killed run")
  return done


def swap_in(staging: str | os.PathLike, dest: str | os.PathLike) -> None:
  """Replaces the folder `dest` by `staging` with renames; the old one is removed last,
  so a crash at any point leaves a complete folder at `dest` (or the old one beside it)."""
  staging, dest = pathlib.Path(staging), pathlib.Path(dest)
  old = None
  if dest.exists():
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(dest, old)
  os.rename(staging, dest)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
