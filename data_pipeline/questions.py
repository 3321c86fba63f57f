"""CT Open-style questions derived from structured results, labels from analyses only.

The option sentences are copied from the CT Open pickles (Winter/Summer 2025) so a
model trained here meets the same wording at evaluation. A label is emitted only
when the record determines it:
  * significance from the reported p-value against 0.05: an upper bound below it
    ("p<0.001") is significant; a value or lower bound at/above it ("p=0.2",
    "p>0.05") is not; anything else ("p>0.01", "p<=0.05") is undetermined;
  * direction from the two arms' reported values with the outcome's polarity.
    The estimate's sign is not used: registries do not say which arm was
    subtracted from which (or divided by which), so its sign is ambiguous.
Directional questions need the direction even when the result is not significant,
so the filter does not depend on the label (skipping only significant results
without values would bias the kept labels toward "not met").
When polarity is unknown only the neutral "which arm's value is higher" question
is emitted, with `label_basis: "neutral_unknown_polarity"`. Polarity is the
outcome's (polarity.infer_polarity, which reads the title first).
Arms are named by their protocol label, or by the result group's own title where
several groups share one label (dose groups of one arm: "GSK189075 250 mg QD").
"""
from __future__ import annotations

import collections
import re

from typing import Sequence

from data_pipeline.build_report import BuildReport
from data_pipeline.example import Example
from data_pipeline.schema import Analysis, Arm, ArmValue, Outcome, Trial

ALPHA = 0.05
QUESTION_TYPES = ("superiority", "comparative", "endpoint_met", "neutral_higher")
COMPARATOR_TYPES = ("PLACEBO_COMPARATOR", "SHAM_COMPARATOR", "NO_INTERVENTION",
                    "ACTIVE_COMPARATOR")
_PLACEBO_LABEL = re.compile(r"placebo|sham|vehicle|no treatment|control", re.IGNORECASE)
_SUPERIORITY_NI = ("", "superiority", "superiority or other", "superiority or other (legacy)",
                   "other", "no")


def superiority_options(a: str, b: str) -> tuple[str, ...]:
  """CT Open's 2-way question: did study arm a beat study arm b (0 = yes)."""
  return (
      f"The study arm {a} has achieved statistically significant improvements over the "
      f"study arm {b} with respect to this specific endpoint.",
      f"The study arm {a} has not achieved statistically significant improvements over the "
      f"study arm {b} with respect to this specific endpoint, either because of no "
      f"statistical effect or worse effect.")


def comparative_options(a: str, b: str) -> tuple[str, ...]:
  """CT Open's 3-way question: 0 = a significantly better, 1 = a worse, 2 = no difference."""
  return (f"Study Arm {b} is statistically significantly worse than Study Arm {a}.",
          f"Study Arm {a} is statistically significantly worse than Study Arm {b}.",
          f"No statistically significant difference between Study Arm {a} and Study Arm {b}.")


ENDPOINT_OPTIONS = ("This endpoint is met.", "This endpoint is not met.")


def neutral_options(a: str, b: str) -> tuple[str, ...]:
  """For outcomes of unknown polarity: whose reported value is higher (0 = a)."""
  return (f"Study Arm {a} has a higher value than Study Arm {b} on this endpoint.",
          f"Study Arm {b} has a higher value than Study Arm {a} on this endpoint.")


_ARM_PATTERNS = (
    re.compile(r"^The study arm (?P<a>.+) has achieved statistically significant improvements "
               r"over the study arm (?P<b>.+) with respect to this specific endpoint\.$"),
    re.compile(r"^No statistically significant difference between Study Arm (?P<a>.+) and "
               r"Study Arm (?P<b>.+)\.$"),
    re.compile(r"^Study Arm (?P<a>.+) has a higher value than Study Arm (?P<b>.+) on this "
               r"endpoint\.$"),
)


def arms_from_options(options: Sequence[str]) -> tuple[str, str] | None:
  """(study arm, comparator) named in a question's options, or None (no-arm questions)."""
  for o in options:
    for pat in _ARM_PATTERNS:
      m = pat.match(o)
      if m:
        return m.group("a"), m.group("b")
  return None


def significance(an: Analysis) -> bool | None:
  """True / False when the reported p-value decides p < 0.05, else None."""
  p, q = an.p_value, an.p_qualifier
  if p is None:
    return None
  if q in ("<", "<="):
    return True if p < ALPHA or (q == "<" and p <= ALPHA) else None
  if q == "=":
    return p < ALPHA
  if q in (">", ">="):
    return False if p >= ALPHA else None
  return None


def _value_of(outcome: Outcome, arm_id: str) -> ArmValue | None:
  vs = [v for v in outcome.values if v.arm_id == arm_id]
  return vs[0] if len(vs) == 1 else None


def _arm_of(trial: Trial, v: ArmValue) -> Arm | None:
  """The protocol arm of a result group, by label (group and arm ids are different spaces)."""
  return next((arm for arm in trial.arms if arm.label == v.arm_label), None)


def arm_text(arm: Arm) -> str:
  """How an arm is shown in a prompt: label, type, description."""
  typ = arm.type.replace("_", " ").lower()
  desc = arm.description or ", ".join(iv.name for iv in arm.interventions)
  return f"{arm.label} ({typ}): {desc}" if typ else f"{arm.label}: {desc}"


def endpoint_text(outcome: Outcome) -> str:
  tf = f" Time frame: {outcome.time_frame}." if outcome.time_frame else ""
  return f"{outcome.title.rstrip('. ')} ({outcome.type} outcome).{tf}"


def _question(trial: Trial, outcome: Outcome, k: int, j: int, qtype: str, a: ArmValue,
              b: ArmValue, arm_a: Arm | None, arm_b: Arm | None, options, label, basis,
              names: tuple[str, str]) -> Example:
  return Example(
      id=f"{trial.source}:{trial.id}:o{k}:a{j}:{qtype}", source=trial.source, kind="question",
      trial_id=trial.id, options=tuple(options), label=label, title=trial.title,
      endpoint=endpoint_text(outcome), arms=tuple(arm_text(x) for x in trial.arms),
      question_type=qtype, label_basis=basis, outcome_index=k, outcome_title=outcome.title,
      outcome_type=outcome.type, polarity=outcome.polarity, arm_a=names[0], arm_b=names[1],
      group_a_title=a.group_title, group_b_title=b.group_title,
      arm_a_id=arm_a.id if arm_a else "", arm_b_id=arm_b.id if arm_b else "",
      group_a_id=a.arm_id, group_b_id=b.arm_id, value_a=a.value, value_b=b.value,
      unit=outcome.unit)


def _usable(trial: Trial, k: int, j: int, outcome: Outcome, an: Analysis, report, source):
  """(a, b, arm_a, arm_b, significant, a_higher, names) or None after counting the reason."""
  rid = f"{trial.id}:o{k}:a{j}"

  def skip(reason):
    if report is not None:
      report.add_skip(source, reason, rid)
    return None

  if len(an.arm_ids) != 2:
    return skip("analysis_not_pairwise")
  if an.non_inferiority.strip().lower() not in _SUPERIORITY_NI:
    return skip("non_inferiority_analysis")
  if an.p_value is None:
    return skip("no_p_value")
  sig = significance(an)
  if sig is None:
    return skip("p_value_undetermined")
  va, vb = (_value_of(outcome, i) for i in an.arm_ids)
  if va is None or vb is None or va.value is None or vb.value is None:
    return skip("no_arm_values")
  if va.value_qualifier != "=" or vb.value_qualifier != "=":
    return skip("censored_arm_value")
  if va.value == vb.value:
    return skip("equal_arm_values")
  na, nb = arm_name(outcome, va), arm_name(outcome, vb)
  if not na or not nb or na == nb:
    # Several result groups share one label and one title: the option sentences
    # could not tell them apart.
    return skip("ambiguous_arm_label")
  arm_a, arm_b = _arm_of(trial, va), _arm_of(trial, vb)
  if _is_comparator(arm_a, va) and not _is_comparator(arm_b, vb):
    # the study arm is the non-comparator
    va, vb, arm_a, arm_b, na, nb = vb, va, arm_b, arm_a, nb, na
  return va, vb, arm_a, arm_b, sig, va.value > vb.value, (na, nb)


def arm_name(outcome: Outcome, v: ArmValue) -> str:
  """The protocol arm label, else the group's own title where groups share the label.

  '' when neither is unique within the outcome.
  """
  labels = [w.arm_label for w in outcome.values]
  if labels.count(v.arm_label) == 1:
    return v.arm_label
  titles = [w.group_title for w in outcome.values if w.arm_label == v.arm_label]
  return v.group_title if v.group_title and titles.count(v.group_title) == 1 else ""


def _is_comparator(arm: Arm | None, v: ArmValue) -> bool:
  """By the protocol arm type where the group maps to an arm, else a placebo-like label."""
  if arm is not None and arm.type:
    return arm.type in COMPARATOR_TYPES
  return bool(_PLACEBO_LABEL.search(v.arm_label))


def derive_questions(trial: Trial, report: BuildReport | None = None,
                     question_types=QUESTION_TYPES) -> list[Example]:
  """All questions the trial's analyses determine; skips counted under trial.source."""
  source = f"questions:{trial.source}"
  out = []
  for k, outcome in enumerate(trial.outcomes):
    polarity = outcome.polarity
    for j, an in enumerate(outcome.analyses):
      u = _usable(trial, k, j, outcome, an, report, source)
      if u is None:
        continue
      a, b, arm_a, arm_b, sig, a_higher, names = u

      def q(qtype, options, label, basis="p_value_and_arm_values"):
        return _question(trial, outcome, k, j, qtype, a, b, arm_a, arm_b, options, label,
                         basis, names)

      if polarity == "unknown":
        if "neutral_higher" in question_types:
          out.append(q("neutral_higher", neutral_options(*names), 0 if a_higher else 1,
                       "neutral_unknown_polarity"))
        continue
      a_better = a_higher == (polarity == "higher_better")
      if "superiority" in question_types:
        out.append(q("superiority", superiority_options(*names), 0 if sig and a_better else 1))
      if "comparative" in question_types:
        out.append(q("comparative", comparative_options(*names),
                     2 if not sig else (0 if a_better else 1)))
      # "Endpoint met" is only well defined when one comparison decides the endpoint.
      if ("endpoint_met" in question_types and outcome.type == "primary"
          and len(outcome.analyses) == 1):
        out.append(q("endpoint_met", ENDPOINT_OPTIONS, 0 if sig and a_better else 1))
  if report is not None:
    report.add_read(source)
  return out


# CT Open's meta label of each derived question type that is a benchmark type (the neutral
# "which value is higher" question is not).
BENCHMARK_META = {"superiority": "distinguishable_arm", "comparative": "distinguishable_arm",
                  "endpoint_met": "no_arm"}


def benchmark_form(qs: Sequence[Example]) -> list[Example]:
  """Derived questions of benchmark types given CT Open's key and category, so the eval
  scores them with the benchmark's code when CT Open itself is absent: key (trial id,
  "o<k>: <outcome title>", index within that endpoint), category from the meta label.
  Questions of other types are left out (the caller counts them)."""
  out, seen = [], collections.Counter()
  for q in qs:
    meta = BENCHMARK_META.get(q.question_type)
    if meta is None:
      continue
    endpoint_str = f"o{q.outcome_index}: {q.outcome_title}"
    qi = seen[(q.trial_id, endpoint_str)]
    seen[(q.trial_id, endpoint_str)] += 1
    out.append(q.replace(nct_id=q.trial_id, endpoint_str=endpoint_str, question_index=qi,
                         meta_label=meta, category=f"{q.n_options}-way/" + (
                             "implicit" if meta == "no_arm" else "explicit")))
  return out


def derive_all(trials, report: BuildReport | None = None,
               question_types=QUESTION_TYPES) -> list[Example]:
  """derive_questions over many trials, in order."""
  out = []
  for t in trials:
    out.extend(derive_questions(t, report, question_types))
  return out
