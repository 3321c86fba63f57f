"""The one read loop of every reader: files expanded, each loaded, split into records,
each record parsed; whatever is malformed is counted in the BuildReport by reason.

A reader supplies three small functions: `load(path)` (the file's content; raises
SkipRecord for a bad file), `records(content, path)` (the (record id, raw record)
pairs) and `parse(raw, report)` (the list of items one record gives; raises
SkipRecord, or schema.SchemaError from validation, to skip the record whole).
Skips of a part of a record (one unparseable value) go into the `report` handed to
`parse`, which counts only when the whole record is kept. Before `parse` sees a
decoded record, `check_record` refuses what no field parser should meet: nesting
deeper than MAX_DEPTH, strings holding a lone surrogate ('\\ud800' in JSON or a
pickle: not UTF-8, so nothing could write it out) and integers beyond a float's range.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Callable, Iterable

from data_pipeline.build_report import BuildReport
from data_pipeline.schema import SchemaError

MAX_DEPTH = 64  # a registry study nests about 8 deep, a CT Open entry about 6
_FLOAT_BITS = 1024  # ints of more bits do not fit a float (the readers' numbers)


class SkipRecord(Exception):
  """Raised by a loader or parser: the file or record is skipped and counted under `reason`."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason, self.detail = reason, detail


def check_record(raw) -> None:
  """Raises SkipRecord (too_deep / lone_surrogate / number_out_of_range) for a decoded
  record (dicts, lists, tuples, sets, scalars) no field parser should see. Iterative and
  cycle-safe (a pickle can hold a list inside itself)."""
  stack, seen = [(raw, 0)], set()
  while stack:
    x, depth = stack.pop()
    if isinstance(x, str):
      if not x.isascii():
        try:
          x.encode("utf-8")
        except UnicodeEncodeError as e:
          raise SkipRecord("lone_surrogate", f"{x[max(0, e.start - 20):e.start]!r}") from e
    elif isinstance(x, int):
      if x.bit_length() > _FLOAT_BITS:
        raise SkipRecord("number_out_of_range", f"an integer of {x.bit_length()} bits")
    elif isinstance(x, (dict, list, tuple, set, frozenset)):
      if depth >= MAX_DEPTH:
        raise SkipRecord("too_deep", f"containers nested over {MAX_DEPTH} deep")
      if id(x) in seen:
        continue
      seen.add(id(x))
      items = [v for kv in x.items() for v in kv] if isinstance(x, dict) else x
      stack.extend((v, depth + 1) for v in items)


def expand_paths(path_or_paths, suffix: str) -> list[pathlib.Path]:
  """Files named directly, and the `suffix` files of folders named, in sorted order."""
  items = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else path_or_paths
  out = []
  for p in map(pathlib.Path, items):
    out.extend(sorted(p.glob(f"*{suffix}")) if p.is_dir() else [p])
  return out


def parse_records(records: Iterable[tuple[str, Any]], parse: Callable[[Any, BuildReport], list],
                  source: str, report: BuildReport, count_read: bool = True) -> list:
  """Parses each (record id, raw) pair; a record that raises is counted and skipped whole.

  `count_read=False` for auxiliary tables whose rows are not records of `source`
  (their skips still count).
  """
  out = []
  for rid, raw in records:
    sub = BuildReport()  # part-of-record skips count only if the record is kept
    try:
      check_record(raw)
      items = parse(raw, sub)
    except SkipRecord as e:
      report.add_skip(source, e.reason, rid)
      continue
    except SchemaError:
      report.add_skip(source, "invalid_record", rid)
      continue
    report.merge(sub)
    if count_read:
      report.add_read(source, len(items))
    out.extend(items)
  return out


def read_files(path_or_paths, suffix: str, source: str, report: BuildReport, *,
               load: Callable[[pathlib.Path], Any],
               records: Callable[[Any, pathlib.Path], Iterable[tuple[str, Any]]],
               parse: Callable[[Any, BuildReport], list], count_read: bool = True) -> list:
  """Every item of every record of every file; unreadable files are counted, never fatal."""
  out = []
  for path in expand_paths(path_or_paths, suffix):
    try:
      content = load(path)
    except SkipRecord as e:
      report.add_skip(source, e.reason, f"{path}: {e.detail}" if e.detail else str(path))
      continue
    except OSError:
      report.add_skip(source, "unreadable_file", str(path))
      continue
    out.extend(parse_records(records(content, path), parse, source, report, count_read))
  return out
