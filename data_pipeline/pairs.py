"""Counterfactual pairs: an anchor with a known result, a target some factors away.

Natural pairs come from inside one trial, where everything but the changed factor
is the same by construction: dose-ranging arms (same drug, different dose, same
comparator), paired outcomes (same arms, another endpoint), comparator changes
(same arm, another comparator); they are for training only (splits.assign_splits).
Approximate pairs and chains come from other trials: every target with each of its
retrieved anchors (anchors.find_anchors: similar, time-respecting, from training
trials), the factors that differ listed as the steps of the walk from anchor to
target in the configured factor order (data.factor_order).

Every question needs `facts` first (facts.attach_facts): the factor values read
from its Trial, so pairing never looks a trial up again.
"""
from __future__ import annotations

import collections
from typing import Iterator, Sequence

from data_pipeline import templates
from data_pipeline.anchors import Retrieved
from data_pipeline.build_report import BuildReport
from data_pipeline.example import Example, Factor
from data_pipeline.facts import compare_facts


def make_pair(anchor: Example, target: Example, kind: str, factors: Sequence[Factor],
              **extra) -> Example:
  """A rendered pair Example (Example.pair): the target's question, the anchor's answer."""
  return templates.render(Example.pair(anchor, target, kind, factors, **extra))


def _qtype(q: Example) -> str:
  return q.question_type or f"{q.n_options}-way"


def natural_pairs(questions: Sequence[Example], report: BuildReport | None = None,
                  max_anchors: int = 3) -> list[Example]:
  """Pairs inside one trial: paired outcomes, comparator changes, dose-ranging arms.

  Questions need `facts` (attach_facts). Each target keeps at most `max_anchors`
  anchors per perturbation type, the first in question order.
  """
  return list(iter_natural_pairs(questions, report, max_anchors))


def iter_natural_pairs(questions: Sequence[Example], report: BuildReport | None = None,
                       max_anchors: int = 3) -> Iterator[Example]:
  """natural_pairs one at a time, in the same order (a build streams them)."""
  by_group = collections.defaultdict(list)
  for q in questions:
    by_group[(q.trial_id, _qtype(q))].append(q)
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
        pair = make_pair(anchor, target, "natural_pair", [factor])
        used[ptype] += 1
        if report is not None:
          report.add_read(f"pairs:natural_pair:{ptype}")
        yield pair


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


def cross_trial_pairs(target: Example, anchors: Sequence[Retrieved],
                      factor_order: Sequence[str], report: BuildReport | None = None
                      ) -> list[Example]:
  """One Example per retrieved anchor: a chain when the walk has intermediate steps (two
  or more differing factors), else an approximate pair (one step, or none known).

  Both carry the factors that differ (facts.compare_facts), in `factor_order`: the
  steps from the anchor to the target; factors unknown on either side are listed in
  `unknown_factors`, never steps. The target's label is the answer (its known result).
  One record per (target, anchor), not two, so no stage sees the same walk twice.
  """
  out = []
  for r in anchors:
    steps, unknown = compare_facts(r.question.facts, target.facts, factor_order)
    kind = "chain" if len(steps) >= 2 else "approximate_pair"
    out.append(make_pair(r.question, target, kind, steps, unknown_factors=unknown,
                         similarity=r.similarity))
    if report is not None:
      report.add_read(f"pairs:{kind}:{len(steps)}_factors")
  return out
