"""Trial-level splits that cannot leak a held-out result into training.

A split is chosen per trial, from a SHA-256 of (seed, trial id) rather than Python's
per-process randomised `hash`, so every run and every host agree. CT Open keeps its
time order: trials named in `eval_trial_ids` (the Summer 2025 release) are `eval`,
everything else is hashed into train / dev / rl. An example takes its target
trial's split. Cross-trial anchors must come from training trials (train or rl):
a pair whose anchor is a dev or eval trial would show that trial's observed
result, so it is dropped (and counted). Natural pairs keep an anchor from the
target's own trial, which stays within one split.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Iterable, Mapping

from data_pipeline.example import Example

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


def assign_splits(examples: Iterable[Example], seed: int, *, dev_fraction: float = 0.1,
                  rl_fraction: float = 0.1, eval_fraction: float = 0.0,
                  eval_trial_ids: Iterable[str] = (),
                  report=None) -> dict[str, list[Example]]:
  """Groups copies of the examples, `split` set from the target trial, by split.

  Returns {split: [examples]} with leaky pairs removed; each drop is counted in
  `report` (a BuildReport) under source 'splits', reason 'anchor_in_<split>'.
  """
  eval_ids = set(eval_trial_ids)
  memo: dict[str, str] = {}

  def split_of(tid: str) -> str:
    if tid not in memo:
      memo[tid] = "eval" if tid in eval_ids else trial_split(
          tid, seed, dev_fraction, rl_fraction, eval_fraction)
    return memo[tid]

  out: dict[str, list[Example]] = collections.defaultdict(list)
  for ex in examples:
    split = split_of(ex.trial_id)
    anchor = ex.anchor_trial_id
    if anchor and anchor != ex.trial_id:
      a_split = split_of(anchor)
      if a_split not in TRAINING:
        if report is not None:
          report.add_skip("splits", f"anchor_in_{a_split}", ex.id)
        continue
    out[split].append(dataclasses.replace(ex, split=split))
  return dict(out)


def ct_open_eval_ids(examples: Iterable[Example], eval_release: str = "Summer_2025") -> set[str]:
  """Trial ids of CT Open examples from the held-out release.

  The release is the reader's `split` (the file stem); call this before
  assign_splits, which sets `split`.
  """
  return {ex.trial_id for ex in examples
          if ex.source == "ct_open" and ex.split == eval_release}


def assert_no_leakage(examples_by_split: Mapping[str, Iterable[Example]]) -> None:
  """Raises LeakageError naming every held-out trial that training can see.

  Checks: (1) a trial is the target of one split only; (2) no dev/eval target is
  a target or an anchor in train/rl; (3) cross-trial anchors of dev/eval examples
  are not themselves dev/eval targets.
  """
  targets: dict[str, set[str]] = collections.defaultdict(set)
  anchors: dict[str, set[str]] = collections.defaultdict(set)
  cross_anchors: dict[str, set[str]] = collections.defaultdict(set)
  for split, exs in examples_by_split.items():
    for ex in exs:
      targets[split].add(ex.trial_id)
      a = ex.anchor_trial_id
      if a:
        anchors[split].add(a)
        if a != ex.trial_id:
          cross_anchors[split].add(a)
  problems = []
  splits = sorted(targets)
  for i, s1 in enumerate(splits):
    for s2 in splits[i + 1:]:
      both = targets[s1] & targets[s2]
      if both:
        problems.append(f"targets in both {s1} and {s2}: {sorted(both)[:20]}")
  held = set().union(*(targets[s] for s in HELD_OUT if s in targets))
  for s in TRAINING:
    seen = (targets.get(s, set()) | anchors.get(s, set())) & held
    if seen:
      problems.append(f"held-out trials seen in {s}: {sorted(seen)[:20]}")
  for s in HELD_OUT:
    bad = cross_anchors.get(s, set()) & held
    if bad:
      problems.append(f"held-out trials used as anchors in {s}: {sorted(bad)[:20]}")
  if problems:
    raise LeakageError("; ".join(problems))
