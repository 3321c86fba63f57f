"""Trial-level splits that cannot leak a held-out result into training.

A split is chosen per trial, from a SHA-256 of (seed, trial id) rather than Python's
per-process randomised `hash`, so every run and every host agree. CT Open keeps its
time order: trials named in `eval_trial_ids` (the Summer 2025 release) are `eval`,
everything else is hashed into train / dev / rl. An example takes its target
trial's split. Cross-trial anchors must come from training trials (train or rl):
a pair whose anchor is a dev or eval trial would show that trial's observed
result, so it is dropped (and counted). Natural pairs keep an anchor from the
target's own trial: they are for training only (a held-out target's same-trial
anchor is published with it), so in dev / eval they are dropped (and counted).
"""
from __future__ import annotations

import collections
import hashlib
from typing import Iterable, Mapping

from data_pipeline.example import ARM_KINDS, PAIR_KINDS, Example

TRAINING = ("train", "rl")
HELD_OUT = ("dev", "eval")


class LeakageError(AssertionError):
  """A held-out trial appears where training could see it; the message lists ids."""


def unit_hash(key: str, seed: int) -> float:
  """A deterministic number in [0, 1) from (seed, key)."""
  h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
  return int.from_bytes(h[:8], "big") / 2.0**64


def trial_split(trial_id: str, seed: int, dev_fraction: float = 0.1,
                rl_fraction: float = 0.1, eval_fraction: float = 0.0) -> str:
  """Hash split of one trial: [eval | dev | rl | train] by cumulative fractions."""
  if min(dev_fraction, rl_fraction, eval_fraction) < 0 or \
      dev_fraction + rl_fraction + eval_fraction >= 1:
    raise ValueError("fractions must be >= 0 and sum to < 1 (train gets the rest)")
  u = unit_hash(trial_id, seed)
  for name, frac in (("eval", eval_fraction), ("dev", dev_fraction), ("rl", rl_fraction)):
    if u < frac:
      return name
    u -= frac
  return "train"


class TrialSplits:
  """trial id -> split: `eval` for the held-out release's trials, else the hash split.

  The build asks it before pairing (anchors come from training trials only) and
  assign_splits after, so both agree.
  """

  def __init__(self, seed: int, *, dev_fraction: float = 0.1, rl_fraction: float = 0.1,
               eval_fraction: float = 0.0, eval_trial_ids: Iterable[str] = ()):
    self.seed, self.fractions = seed, (dev_fraction, rl_fraction, eval_fraction)
    self.eval_ids = frozenset(eval_trial_ids)
    self.memo: dict[str, str] = {}

  def __call__(self, trial_id: str) -> str:
    if trial_id not in self.memo:
      self.memo[trial_id] = "eval" if trial_id in self.eval_ids else trial_split(
          trial_id, self.seed, *self.fractions)
    return self.memo[trial_id]


def drop_reason(ex: Example, split_of: TrialSplits) -> str:
  """Why `ex` may not be kept ('' when it may): 'anchor_in_<split>' (a cross-trial anchor
  from a held-out trial), 'natural_pair_in_<split>' (a same-trial pair of a held-out
  target: its anchor's result is published with the target's) or '<arm kind>_in_<split>'
  (a per-arm operator's example of a held-out target: training only)."""
  anchor = ex.anchor_trial_id
  if anchor and anchor != ex.trial_id and split_of(anchor) not in TRAINING:
    return f"anchor_in_{split_of(anchor)}"
  if anchor == ex.trial_id and ex.kind in PAIR_KINDS and split_of(ex.trial_id) in HELD_OUT:
    return f"natural_pair_in_{split_of(ex.trial_id)}"
  if ex.kind in ARM_KINDS and split_of(ex.trial_id) in HELD_OUT:
    return f"{ex.kind}_in_{split_of(ex.trial_id)}"  # shows the target's own result
  return ""


def split_or_drop(ex: Example, split_of: TrialSplits, report=None) -> str:
  """The split `ex` goes to, or '' when it is dropped (drop_reason; counted in `report`
  under source 'splits'). One example at a time, so a build can stream."""
  why = drop_reason(ex, split_of)
  if why:
    if report is not None:
      report.add_skip("splits", why, ex.id)
    return ""
  return split_of(ex.trial_id)


def assign_splits(examples: Iterable[Example], seed: int, *, dev_fraction: float = 0.1,
                  rl_fraction: float = 0.1, eval_fraction: float = 0.0,
                  eval_trial_ids: Iterable[str] = (),
                  report=None) -> dict[str, list[Example]]:
  """Groups copies of the examples, `split` set from the target trial, by split.

  Returns {split: [examples]} with leaky pairs removed; each drop is counted in
  `report` (a BuildReport) under source 'splits': 'anchor_in_<split>' (a cross-trial
  anchor from a held-out trial), 'natural_pair_in_<split>' (a same-trial pair of a
  held-out target: its anchor's result is published with the target's, so such
  pairs are for training only).
  """
  split_of = TrialSplits(seed, dev_fraction=dev_fraction, rl_fraction=rl_fraction,
                         eval_fraction=eval_fraction, eval_trial_ids=eval_trial_ids)
  out: dict[str, list[Example]] = collections.defaultdict(list)
  for ex in examples:
    split = split_or_drop(ex, split_of, report)
    if split:
      out[split].append(ex.replace(split=split))
  return dict(out)


def ct_open_eval_ids(examples: Iterable[Example], eval_release: str = "Summer_2025") -> set[str]:
  """Trial ids of CT Open examples from the held-out release.

  The release is the reader's `split` (the file stem); call this before
  assign_splits, which sets `split`.
  """
  return {ex.trial_id for ex in examples
          if ex.source == "ct_open" and ex.split == eval_release}


class LeakageCheck:
  """assert_no_leakage one example at a time: keeps only trial ids per split (compact keys,
  not examples), so a streamed build checks everything it writes."""

  def __init__(self):
    self.targets: dict[str, set[str]] = collections.defaultdict(set)
    self.anchors: dict[str, set[str]] = collections.defaultdict(set)
    self.cross_anchors: dict[str, set[str]] = collections.defaultdict(set)
    self.problems: list[str] = []

  def add(self, split: str, ex: Example) -> None:
    self.targets[split].add(ex.trial_id)
    a = ex.anchor_trial_id
    if a:
      self.anchors[split].add(a)
      if a != ex.trial_id:
        self.cross_anchors[split].add(a)
      elif split in HELD_OUT and ex.kind in PAIR_KINDS:
        self.problems.append(f"{split} example {ex.id} has an anchor from its own trial")

  def merge(self, other: "LeakageCheck") -> None:
    """Adds what `other` saw (a part of the examples checked apart)."""
    for mine, theirs in ((self.targets, other.targets), (self.anchors, other.anchors),
                         (self.cross_anchors, other.cross_anchors)):
      for s, ids in theirs.items():
        mine[s] |= ids
    self.problems.extend(other.problems)

  def check(self) -> None:
    """Raises LeakageError naming every held-out trial that training can see."""
    targets, problems = self.targets, list(self.problems)
    splits = sorted(targets)
    for i, s1 in enumerate(splits):
      for s2 in splits[i + 1:]:
        both = targets[s1] & targets[s2]
        if both:
          problems.append(f"targets in both {s1} and {s2}: {sorted(both)[:20]}")
    held = set().union(*(targets[s] for s in HELD_OUT if s in targets))
    for s in TRAINING:
      seen = (targets.get(s, set()) | self.anchors.get(s, set())) & held
      if seen:
        problems.append(f"held-out trials seen in {s}: {sorted(seen)[:20]}")
    for s in HELD_OUT:
      bad = self.cross_anchors.get(s, set()) & held
      if bad:
        problems.append(f"held-out trials used as anchors in {s}: {sorted(bad)[:20]}")
    if problems:
      raise LeakageError("; ".join(problems))


def assert_no_leakage(examples_by_split: Mapping[str, Iterable[Example]]) -> None:
  """Raises LeakageError naming every held-out trial that training can see.

  Checks: (1) a trial is the target of one split only; (2) no dev/eval target is
  a target or an anchor in train/rl; (3) cross-trial anchors of dev/eval examples
  are not themselves dev/eval targets; (4) no dev/eval example's anchor is from
  its own trial.
  """
  check = LeakageCheck()
  for split, exs in examples_by_split.items():
    for ex in exs:
      check.add(split, ex)
  check.check()
