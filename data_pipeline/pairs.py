"""Counterfactual pairs: an anchor with a known result, a target one factor away.

Natural pairs come from inside one trial, where everything but the changed factor
is the same by construction: dose-ranging arms (same drug, different dose, same
comparator), paired outcomes (same arms, another endpoint), comparator changes
(same arm, another comparator). Approximate pairs come from similar trials
(retrieval.TrialIndex) and are kept only when the anchor and the target differ
in exactly one main factor (facts.FACTORS) and agree on the rest; a factor unknown
on both sides counts as agreeing and is listed in `unknown_factors`, a factor known
on one side only rejects the pair. Chains order several one-factor steps.

Every question needs `facts` first (facts.attach_facts): the factor values read
from its Trial, so pairing never looks a trial up again.
"""
from __future__ import annotations

import collections
import itertools
from typing import Iterable, Sequence

from data_pipeline import templates
from data_pipeline.build_report import BuildReport
from data_pipeline.example import Example, Factor
from data_pipeline.facts import FACTORS, compare_facts
from data_pipeline.retrieval import TrialIndex

APPROX_FACTORS = ("country", "phase", "dose", "population", "comparator")



def make_pair(anchor: Example, target: Example, kind: str, factors: Sequence[Factor],
              **extra) -> Example:
  """A rendered pair Example (Example.pair): the target's question, the anchor's answer."""
  return templates.render(Example.pair(anchor, target, kind, factors, **extra))


def _qtype(q: Example) -> str:
  return q.question_type or f"{q.n_options}-way"


def _by_trial(questions: Iterable[Example]) -> dict[str, list[Example]]:
  out = collections.defaultdict(list)
  for q in questions:
    out[q.trial_id].append(q)
  return out


def natural_pairs(questions: Sequence[Example], report: BuildReport | None = None,
                  max_anchors: int = 3) -> list[Example]:
  """Pairs inside one trial: paired outcomes, comparator changes, dose-ranging arms.

  Questions need `facts` (attach_facts). Each target keeps at most `max_anchors`
  anchors per perturbation type, the first in question order.
  """
  by_group = collections.defaultdict(list)
  for q in questions:
    by_group[(q.trial_id, _qtype(q))].append(q)
  out = []
  for _, qs in sorted(by_group.items()):
    for target in qs:
      used = collections.Counter()
      for anchor in qs:
        if anchor is target or anchor.id == target.id:
          continue
        ptype = _natural_type(anchor, target)
        if ptype is None or used[ptype] >= max_anchors:
          continue
        key = {"outcome": "outcome", "comparator": "arm_b", "dose": "dose"}[ptype]
        factor = Factor(ptype, getattr(anchor.facts, key), getattr(target.facts, key))
        out.append(make_pair(anchor, target, "natural_pair", [factor]))
        used[ptype] += 1
        if report is not None:
          report.add_read(f"pairs:natural_pair:{ptype}")
  return out


def _natural_type(a: Example, t: Example) -> str | None:
  fa, ft = a.facts, t.facts
  same_arms = (fa.arm_a, fa.arm_b) == (ft.arm_a, ft.arm_b)
  same_options = a.options == t.options
  outcome_differs = fa.outcome != ft.outcome
  if outcome_differs and (same_options or (same_arms and fa.arm_a)):
    return "outcome"
  if outcome_differs or not fa.arm_a or not ft.arm_a:
    return None
  if fa.arm_a == ft.arm_a and fa.arm_b != ft.arm_b and fa.arm_b and ft.arm_b:
    return "comparator"
  if (fa.arm_b == ft.arm_b and fa.arm_a != ft.arm_a
      and set(fa.drugs) & set(ft.drugs) and fa.dose and ft.dose
      and fa.dose.split(" ", 1)[1:] == ft.dose.split(" ", 1)[1:]
      and fa.dose != ft.dose and fa.dose_frequency == ft.dose_frequency):
    return "dose"
  return None


def _comparable(anchor: Example, target: Example) -> bool:
  """Cross-trial anchors must ask the same kind of question about the same drugs.

  The study arm's active intervention names must be equal as sets: a shared drug
  with different partners ("X + A" vs "X + B") would be a second changed factor.
  """
  if _qtype(anchor) != _qtype(target) or anchor.n_options != target.n_options:
    return False
  da, dt = set(anchor.facts.drugs), set(target.facts.drugs)
  if da or dt:
    return da == dt
  return anchor.facts.arm_a == "" and target.facts.arm_a == ""


def approximate_pairs(questions: Sequence[Example], index: TrialIndex, k: int = 10,
                      report: BuildReport | None = None, max_anchors: int = 3) -> list[Example]:
  """Cross-trial pairs among the k most similar trials, differing in exactly one factor.

  The outcome must match (same_outcome) so the one recorded factor is the only
  main difference; the cosine similarity of the two trials is kept.
  """
  by_trial = _by_trial(questions)
  out = []
  near = _NearestCache(index, k)
  for target in questions:
    n = 0
    if target.trial_id not in index:
      continue
    for tid, score in near(target.trial_id):
      for anchor in by_trial.get(tid, ()):
        if n >= max_anchors or not _comparable(anchor, target):
          continue
        cmp = compare_facts(anchor.facts, target.facts, APPROX_FACTORS + ("outcome",))
        if cmp is None:
          continue
        diffs, unknown = cmp
        if len(diffs) != 1 or diffs[0].factor == "outcome":
          continue
        out.append(make_pair(anchor, target, "approximate_pair", diffs,
                             unknown_factors=unknown, similarity=round(score, 4)))
        n += 1
        if report is not None:
          report.add_read(f"pairs:approximate_pair:{diffs[0].factor}")
  return out


def build_chains(target: Example, anchors: Sequence[Example], k: int,
                 report: BuildReport | None = None) -> list[Example]:
  """Up to k chain Examples for `target`: fewest steps first, then anchor id.

  Each chain lists, in FACTORS order, every factor that differs between the
  anchor and the target (value before -> after); anchors that cannot be compared
  factor by factor, or that do not differ at all, are left out.
  """
  cands = []
  for anchor in anchors:
    if anchor.trial_id == target.trial_id or not _comparable(anchor, target):
      continue
    cmp = compare_facts(anchor.facts, target.facts, FACTORS)
    if cmp is None or not cmp[0]:
      continue
    cands.append((len(cmp[0]), anchor.id, anchor, cmp))
  cands.sort(key=lambda c: (c[0], c[1]))
  out = []
  for _, _, anchor, (steps, unknown) in cands[:k]:
    out.append(make_pair(anchor, target, "chain", steps, unknown_factors=unknown))
    if report is not None:
      report.add_read(f"pairs:chain:{len(steps)}_steps")
  return out


def all_chains(questions: Sequence[Example], index: TrialIndex, k: int = 2,
               n_neighbours: int = 10, report: BuildReport | None = None) -> list[Example]:
  """build_chains for every question, anchors drawn from its nearest trials."""
  by_trial = _by_trial(questions)
  out = []
  near = _NearestCache(index, n_neighbours)
  anchors_of: dict[str, list[Example]] = {}
  for target in questions:
    tid = target.trial_id
    if tid not in index:
      continue
    if tid not in anchors_of:
      anchors_of[tid] = list(itertools.chain.from_iterable(
          by_trial.get(t, ()) for t, _ in near(tid)))
    out.extend(build_chains(target, anchors_of[tid], k, report))
  return out


class _NearestCache:
  """index.nearest per trial id, computed once: a trial has many questions."""

  def __init__(self, index: TrialIndex, k: int):
    self.index, self.k, self.memo = index, k, {}

  def __call__(self, trial_id: str) -> list[tuple[str, float]]:
    if trial_id not in self.memo:
      self.memo[trial_id] = self.index.nearest(trial_id, self.k)
    return self.memo[trial_id]
