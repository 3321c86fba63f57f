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
is emitted, with `label_basis: "neutral_unknown_polarity"`.
"""
from __future__ import annotations

import re

from data_pipeline.build_report import BuildReport
from data_pipeline.schema import Analysis, Arm, ArmValue, Outcome, Trial

ALPHA = 0.05
QUESTION_TYPES = ("superiority", "comparative", "endpoint_met", "neutral_higher")
COMPARATOR_TYPES = ("PLACEBO_COMPARATOR", "SHAM_COMPARATOR", "NO_INTERVENTION",
                    "ACTIVE_COMPARATOR")
_PLACEBO_LABEL = re.compile(r"placebo|sham|vehicle|no treatment|control", re.IGNORECASE)
_SUPERIORITY_NI = ("", "superiority", "superiority or other", "superiority or other (legacy)",
                   "other", "no")


def superiority_options(a: str, b: str) -> list[str]:
  """CT Open's 2-way question: did study arm a beat study arm b (0 = yes)."""
  return [
      f"The study arm {a} has achieved statistically significant improvements over the "
      f"study arm {b} with respect to this specific endpoint.",
      f"The study arm {a} has not achieved statistically significant improvements over the "
      f"study arm {b} with respect to this specific endpoint, either because of no "
      f"statistical effect or worse effect."]


def comparative_options(a: str, b: str) -> list[str]:
  """CT Open's 3-way question: 0 = a significantly better, 1 = a worse, 2 = no difference."""
  return [f"Study Arm {b} is statistically significantly worse than Study Arm {a}.",
          f"Study Arm {a} is statistically significantly worse than Study Arm {b}.",
          f"No statistically significant difference between Study Arm {a} and Study Arm {b}."]


ENDPOINT_OPTIONS = ["This endpoint is met.", "This endpoint is not met."]


def neutral_options(a: str, b: str) -> list[str]:
  """For outcomes of unknown polarity: whose reported value is higher (0 = a)."""
  return [f"Study Arm {a} has a higher value than Study Arm {b} on this endpoint.",
          f"Study Arm {b} has a higher value than Study Arm {a} on this endpoint."]


_ARM_PATTERNS = (
    re.compile(r"^The study arm (?P<a>.+) has achieved statistically significant improvements "
               r"over the study arm (?P<b>.+) with respect to this specific endpoint\.$"),
    re.compile(r"^No statistically significant difference between Study Arm (?P<a>.+) and "
               r"Study Arm (?P<b>.+)\.$"),
    re.compile(r"^Study Arm (?P<a>.+) has a higher value than Study Arm (?P<b>.+) on this "
               r"endpoint\.$"),
)


def arms_from_options(options: list[str]) -> tuple[str, str] | None:
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


# Title cues used only to veto the schema's keyword polarity (schema.infer_polarity
# reads title + description and can be misled, e.g. a response-rate outcome whose
# description mentions progression, or "time to objective disease progression").
_BAD_EVENT = re.compile(r"progression|relapse|recurrence|death|failure|event|metasta|"
                        r"mortality|exacerbation|hospitali|infection|stroke")
_GOOD_CUE = re.compile(r"response|remission|control|improve|success|cure|healing|survival|"
                       r"quality of life|abstinence|seroconversion|seroprotection")
_NEGATED = re.compile(r"\b(decrease|reduction|worsening|deterioration|decline|loss)\b")


def question_polarity(outcome: Outcome) -> tuple[str, str]:
  """(polarity used for labels, veto reason or ''): the schema's, unless the title contradicts it.

  "time to <bad event>" is higher_better; a title that names a decrease of
  something, or a good cue against a lower_better polarity (or a bad event
  against higher_better), gives 'unknown' so no directional label is guessed.
  """
  pol, t = outcome.polarity, outcome.title.lower()
  if re.search(r"\btime to\b", t):
    if _BAD_EVENT.search(t):
      return "higher_better", ("" if pol == "higher_better" else "polarity_corrected_time_to_event")
    return "unknown", ("" if pol == "unknown" else "polarity_veto_time_to")
  if pol == "unknown":
    return pol, ""
  if _NEGATED.search(t):
    return "unknown", "polarity_veto_negated_title"
  good, bad = bool(_GOOD_CUE.search(t)), bool(_BAD_EVENT.search(t))
  if "free survival" in t or "survival" in t:
    bad = False  # "progression-free survival", "survival without relapse" are good
  if (pol == "lower_better" and good and not bad) or (pol == "higher_better" and bad and not good):
    return "unknown", "polarity_veto_title_cue"
  return pol, ""


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


def _base(trial: Trial, outcome: Outcome, k: int, j: int, qtype: str, a: ArmValue,
          b: ArmValue, arm_a: Arm | None, arm_b: Arm | None, options, label, basis) -> dict:
  return {
      "id": f"{trial.source}:{trial.id}:o{k}:a{j}:{qtype}",
      "source": trial.source,
      "kind": "question",
      "perturbation": "",
      "trial_id": trial.id,
      "anchor_trial_id": "",
      "options": options,
      "label": label,
      "prompt": "",
      "completion": "",
      "split": "",
      "category": "",
      "nct_id": "",
      "endpoint_str": "",
      "question_index": -1,
      "title": trial.title,
      "endpoint": endpoint_text(outcome),
      "arms": [arm_text(x) for x in trial.arms],
      "question_type": qtype,
      "label_basis": basis,
      "outcome_index": k,
      "outcome_title": outcome.title,
      "outcome_type": outcome.type,
      "polarity": question_polarity(outcome)[0],
      "arm_a": a.arm_label, "arm_b": b.arm_label,
      "arm_a_id": arm_a.id if arm_a else "", "arm_b_id": arm_b.id if arm_b else "",
      "group_a_id": a.arm_id, "group_b_id": b.arm_id,
  }


def _usable(trial: Trial, k: int, j: int, outcome: Outcome, an: Analysis, report, source):
  """(a, b, arm_a, arm_b, significant, a_higher) or None after counting the reason."""
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
  labels = [v.arm_label for v in outcome.values]
  if labels.count(va.arm_label) > 1 or labels.count(vb.arm_label) > 1:
    # Several result groups share one protocol label (e.g. dose groups of one arm):
    # the option sentences could not tell them apart.
    return skip("ambiguous_arm_label")
  arm_a, arm_b = _arm_of(trial, va), _arm_of(trial, vb)
  if _is_comparator(arm_a, va) and not _is_comparator(arm_b, vb):
    va, vb, arm_a, arm_b = vb, va, arm_b, arm_a  # the study arm is the non-comparator
  return va, vb, arm_a, arm_b, sig, va.value > vb.value


def _is_comparator(arm: Arm | None, v: ArmValue) -> bool:
  """By the protocol arm type where the group maps to an arm, else a placebo-like label."""
  if arm is not None and arm.type:
    return arm.type in COMPARATOR_TYPES
  return bool(_PLACEBO_LABEL.search(v.arm_label))


def derive_questions(trial: Trial, report: BuildReport | None = None,
                     question_types=QUESTION_TYPES) -> list[dict]:
  """All questions the trial's analyses determine; skips counted under trial.source."""
  source = f"questions:{trial.source}"
  out = []
  for k, outcome in enumerate(trial.outcomes):
    usable = []
    for j, an in enumerate(outcome.analyses):
      u = _usable(trial, k, j, outcome, an, report, source)
      if u is not None:
        usable.append((j, u))
    polarity, veto = question_polarity(outcome)
    if veto and usable and report is not None:
      report.add_skip(source, veto, f"{trial.id}:o{k}")
    for j, (a, b, arm_a, arm_b, sig, a_higher) in usable:
      if polarity == "unknown":
        if "neutral_higher" in question_types:
          out.append(_base(trial, outcome, k, j, "neutral_higher", a, b, arm_a, arm_b,
                           neutral_options(a.arm_label, b.arm_label), 0 if a_higher else 1,
                           "neutral_unknown_polarity"))
        continue
      a_better = a_higher == (polarity == "higher_better")
      basis = "p_value_and_arm_values"
      if "superiority" in question_types:
        out.append(_base(trial, outcome, k, j, "superiority", a, b, arm_a, arm_b,
                         superiority_options(a.arm_label, b.arm_label),
                         0 if sig and a_better else 1, basis))
      if "comparative" in question_types:
        out.append(_base(trial, outcome, k, j, "comparative", a, b, arm_a, arm_b,
                         comparative_options(a.arm_label, b.arm_label),
                         2 if not sig else (0 if a_better else 1), basis))
      # "Endpoint met" is only well defined when one comparison decides the endpoint.
      if ("endpoint_met" in question_types and outcome.type == "primary"
          and len(outcome.analyses) == 1):
        out.append(_base(trial, outcome, k, j, "endpoint_met", a, b, arm_a, arm_b,
                         list(ENDPOINT_OPTIONS), 0 if sig and a_better else 1, basis))
  if report is not None:
    report.add_read(source)
  return out


def derive_all(trials, report: BuildReport | None = None,
               question_types=QUESTION_TYPES) -> list[dict]:
  """derive_questions over many trials, in order."""
  out = []
  for t in trials:
    out.extend(derive_questions(t, report, question_types))
  return out
