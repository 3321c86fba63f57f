"""Counts of what each reader read and skipped, with a few example ids per reason.

Every reader takes a BuildReport and records each record it reads or skips, so a
build can say exactly what fell out and why instead of silently shrinking.
ExampleCounts is the other half of a build's report: what the examples written are (per
split, kind, source, factors, labels), counted one record at a time as they are written.

Skips of a part of a record (one unparseable value) use the same counter with a
reason that names the part (e.g. `value_non_numeric`); the record still counts as
read.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterable, Mapping, Sequence

from data_pipeline.example import ARM_KINDS, PAIR_KINDS

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


def label_balance(examples: Iterable[Any]) -> dict:
  """{n_options: {n, fractions: [share of label 0, 1(, 2)]}} of Examples."""
  counts: dict[int, list[int]] = {}
  for ex in examples:
    counts.setdefault(len(ex.options), [0] * len(ex.options))[ex.label] += 1
  return _balance(counts)


def _balance(counts: Mapping[int, list[int]]) -> dict:
  return {str(n): {"n": sum(c), "fractions": [round(x / sum(c), 4) for x in c]}
          for n, c in sorted(counts.items())}


class ExampleCounts:
  """The report's counts of the examples a build writes, added one JSON record
  (Example.to_json's fields) at a time, so a streamed build holds none of them."""

  def __init__(self, splits: Sequence[str]):
    self.splits = tuple(splits)
    self.questions: dict = {}  # source -> question type -> n
    self.pairs_perturbation: dict = {}  # kind -> perturbation -> n (every kind but question)
    self.pairs_source: dict = {}  # kind -> source -> n
    self.n_factors: dict = {s: {} for s in splits}  # split -> pair kind -> n factors -> n
    self.by_kind: dict = {s: collections.Counter() for s in splits}
    self.labels: dict = {s: {} for s in splits}  # split -> n options -> [n per label]
    self.eval_question_sources: set = set()

  def add(self, split: str, rec: Mapping[str, Any]) -> None:
    kind = rec["kind"]
    self.by_kind[split][kind] += 1
    n = len(rec["options"])
    self.labels[split].setdefault(n, [0] * n)[rec["label"]] += 1
    if kind == "question":
      _bump(self.questions, rec["source"], rec["question_type"])
      if split == "eval":
        self.eval_question_sources.add(rec["source"])
      return
    _bump(self.pairs_perturbation, kind, rec["perturbation"])
    _bump(self.pairs_source, kind, rec["source"])
    if kind in PAIR_KINDS:
      _bump(self.n_factors[split], kind, str(len(rec["factors"])))

  def to_dict(self) -> dict:
    """The report's keys for the examples."""
    return {
        "questions_by_source_and_type": self.questions,
        "pairs_by_kind_and_perturbation": self.pairs_perturbation,
        "pairs_by_kind_and_source": self.pairs_source,
        "pairs_by_split_kind_and_n_factors": self.n_factors,
        "split_sizes": {s: sum(self.by_kind[s].values()) for s in self.splits},
        "split_sizes_by_kind": {s: dict(self.by_kind[s]) for s in self.splits},
        "label_balance": {s: _balance(self.labels[s]) for s in self.splits},
    }


def _bump(d: dict, key: str, sub: str) -> None:
  c = d.setdefault(str(key), {})
  c[str(sub)] = c.get(str(sub), 0) + 1


def format_report(r: dict) -> str:
  """The report as plain text, for the terminal."""
  reused = " [reused]" if r["reused"] else ""
  lines = [f"data build v{r['build_version']} ({r['elapsed_s']} s){reused}"]
  lines.append("records read / skipped:")
  for src, d in r["records"].items():
    sk = ", ".join(f"{k}={v['count']}" for k, v in d["skipped"].items())
    lines.append(f"  {src:<20} read {d['read']:>6}  {sk}")
  for src, d in r["questions_skipped"].items():
    lines.append(f"  questions:{src:<10} skipped: "
                 + ", ".join(f"{k}={v['count']}" for k, v in d.items()))
  for src, d in r["dropped"].items():
    lines.append(f"  dropped ({src}): " + ", ".join(f"{k}={v['count']}" for k, v in d.items()))
  lines.append("questions by source / type:")
  for src, d in r["questions_by_source_and_type"].items():
    lines.append(f"  {src:<20} " + ", ".join(f"{k or '-'}={v}" for k, v in sorted(d.items())))
  lines.append("pairs by kind / perturbation (cross-trial kinds: pairs in which each factor "
               "differs):")
  for kind, d in r["pairs_by_kind_and_perturbation"].items():
    if kind == "arm_compare":  # a question shown with its values: no pair, no factor
      continue
    if kind != "natural_pair":
      per = collections.Counter(f for k, v in d.items() for f in k.split("+") if f for _ in
                                range(v))
      d = {f: per[f] for f in r["anchors"]["factor_order"] if per[f]}
    lines.append(f"  {kind:<20} " + ", ".join(f"{k or '-'}={v}" for k, v in d.items()))
  arm_kinds = {s: {k: n for k, n in d.items() if k in ARM_KINDS}
               for s, d in r["split_sizes_by_kind"].items()}
  lines.append("per-arm operators' examples (training splits only), per split: " + "; ".join(
      f"{s} " + ", ".join(f"{k}={n}" for k, n in sorted(d.items()))
      for s, d in arm_kinds.items() if d))
  lines.append("pairs by split / kind / number of differing factors:")
  for s, d in r["pairs_by_split_kind_and_n_factors"].items():
    for kind, c in d.items():
      lines.append(f"  {s:<6} {kind:<17} " + ", ".join(
          f"{k}:{v}" for k, v in sorted(c.items(), key=lambda kv: int(kv[0]))))
  a = r["anchors"]
  lines.append(f"anchors ({a['retriever']}, k={a['k']}): targets with k anchors / with any / "
               "all, per split")
  for s, c in a["coverage"].items():
    share = c.get("with_k", 0) / max(c["targets"], 1)
    lines.append(f"  {s:<6} {c.get('with_k', 0):>5} ({share:.1%}) / {c.get('with_any', 0):>5} / "
                 f"{c['targets']:>5}" + "".join(f"  {k}={c[k]}" for k in
                                              ("no_public_date", "no_trial_text") if k in c))
  lines.append("prompts with a field cut to fit (budget / prompt_len), per split:")
  for s, c in r["prompts"].items():
    lines.append(f"  {s:<6} {c['shortened']:>5} of {c['examples']:>5}, {c['refit']} of them "
                 f"re-rendered for tokens (longest {c['max_tokens']} tokens with BOS, "
                 f"{c['max_chars']} chars)")
  lines.append("splits (label balance: fraction of each label index, per option count):")
  for s, n in r["split_sizes"].items():
    bal = "; ".join(f"{k}-way n={v['n']} {v['fractions']}"
                    for k, v in r["label_balance"][s].items())
    lines.append(f"  {s:<6} {n:>6}  {bal}")
  lines.append(f"eval trials: {r['eval_trials']} ({r['eval_source']})  tokenizer vocab: "
               f"{r['tokenizer_vocab_size']}")
  return "\n".join(lines)
