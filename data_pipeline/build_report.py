"""Counts of what each reader read and skipped, with a few example ids per reason.

Every reader takes a BuildReport and records each record it reads or skips, so a
build can say exactly what fell out and why instead of silently shrinking.
Skips of a part of a record (one unparseable value) use the same counter with a
reason that names the part (e.g. `value_non_numeric`); the record still counts as
read.
"""
from __future__ import annotations

import collections
import dataclasses

MAX_EXAMPLES = 3


@dataclasses.dataclass
class BuildReport:
  read: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  skipped: dict = dataclasses.field(default_factory=dict)   # source -> Counter(reason)
  examples: dict = dataclasses.field(default_factory=dict)  # (source, reason) -> [ids]

  def add_read(self, source: str, n: int = 1):
    self.read[source] += n

  def add_skip(self, source: str, reason: str, record_id: str = ""):
    self.skipped.setdefault(source, collections.Counter())[reason] += 1
    ex = self.examples.setdefault((source, reason), [])
    if record_id and len(ex) < MAX_EXAMPLES and record_id not in ex:
      ex.append(record_id)

  def n_read(self, source: str) -> int:
    return self.read.get(source, 0)

  def n_skipped(self, source: str, reason: str | None = None) -> int:
    c = self.skipped.get(source, collections.Counter())
    return c[reason] if reason is not None else sum(c.values())

  def merge(self, other: "BuildReport") -> "BuildReport":
    """Adds `other` into self (in place) and returns self."""
    self.read.update(other.read)
    for src, c in other.skipped.items():
      self.skipped.setdefault(src, collections.Counter()).update(c)
    for key, ids in other.examples.items():
      ex = self.examples.setdefault(key, [])
      for i in ids:
        if len(ex) < MAX_EXAMPLES and i not in ex:
          ex.append(i)
    return self

  def to_dict(self) -> dict:
    """JSON-serialisable: {source: {read, skipped: {reason: {count, examples}}}}."""
    out = {}
    for src in sorted(set(self.read) | set(self.skipped)):
      out[src] = {
          "read": self.read.get(src, 0),
          "skipped": {
              r: {"count": n, "examples": list(self.examples.get((src, r), []))}
              for r, n in sorted(self.skipped.get(src, {}).items())},
      }
    return out
