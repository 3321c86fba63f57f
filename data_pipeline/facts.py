"""Facts: the factor values of a question, read once from its Trial, so pairing never
looks a trial up again; and the comparison of two questions' facts.

The factors (FACTORS) are who took part (age group and sex; the condition), the
arms (the study arm's drugs and dose, the comparator type), the outcome, the
design (phase, allocation, masking), where the trial ran (countries as regions,
COUNTRY_REGION) and its size (an enrollment bucket). A value is "" when unknown.
"""
from __future__ import annotations

import functools
import re
from typing import Iterable, Mapping, Sequence

from data_pipeline.arms import find_arm
from data_pipeline.doses import parse_doses
from data_pipeline.example import Example, Factor, Facts
from data_pipeline.questions import arms_from_options
from data_pipeline.schema import Arm, Trial

# Every factor, in the default order of a walk from anchor to target (the config key
# data.factor_order): population -> arms -> outcome -> the rest.
FACTORS = ("population", "condition", "drug", "dose", "comparator", "outcome", "phase",
           "allocation", "masking", "country", "sample_size")
# Compared by word overlap (same_text), not equality: free text is never spelt alike.
TEXT_FACTORS = ("outcome", "condition")
SIZE_BUCKETS = ((50, "<50"), (100, "50-99"), (300, "100-299"), (1000, "300-999"))

_REGIONS = {
    "North America": ("United States", "Canada", "Puerto Rico"),
    "Latin America": ("Mexico", "Argentina", "Brazil", "Chile", "Colombia", "Peru",
                      "Venezuela", "Guatemala", "Costa Rica", "Panama", "Ecuador",
                      "Uruguay", "Dominican Republic", "Cuba", "Bolivia", "Paraguay"),
    "Europe": ("Germany", "Spain", "United Kingdom", "Italy", "France", "Poland", "Sweden",
               "Austria", "Belgium", "Hungary", "Netherlands", "Norway", "Greece",
               "Russian Federation", "Switzerland", "Estonia", "Czechia", "Czech Republic",
               "Romania", "Denmark", "Portugal", "Finland", "Ukraine", "Ireland", "Latvia",
               "Bulgaria", "Slovakia", "Lithuania", "Croatia", "Slovenia", "Serbia",
               "Belarus", "Iceland", "Luxembourg", "Georgia", "Moldova", "Bosnia and Herzegovina"),
    "Middle East": ("Israel", "Turkey", "Saudi Arabia", "Iran, Islamic Republic of", "Iran",
                    "Egypt", "Jordan", "Lebanon", "United Arab Emirates", "Kuwait", "Qatar"),
    "East Asia": ("Japan", "China", "Taiwan", "Korea, Republic of", "South Korea",
                  "Hong Kong"),
    "South and Southeast Asia": ("India", "Singapore", "Thailand", "Sri Lanka", "Malaysia",
                                 "Philippines", "Pakistan", "Indonesia", "Vietnam",
                                 "Viet Nam", "Bangladesh", "Nepal"),
    "Africa": ("South Africa", "Morocco", "Mali", "Kenya", "Uganda", "Nigeria", "Tanzania",
               "Malawi", "Zambia", "Zimbabwe", "Ghana", "Ethiopia", "Tunisia", "Botswana"),
    "Oceania": ("Australia", "New Zealand"),
}
COUNTRY_REGION = {c: r for r, cs in _REGIONS.items() for c in cs}
_PLACEBO = re.compile(r"placebo|sham|vehicle|dummy", re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9]+")
_STOP = {"the", "of", "in", "at", "and", "or", "to", "with", "a", "an", "for", "from",
         "on", "by", "baseline", "change", "number", "participants", "percentage",
         "week", "weeks", "month", "months", "day", "days"}
OUTCOME_SAME_JACCARD = 0.5


def region_of(countries: Sequence[str]) -> str:
  """'+'-joined sorted regions; an unmapped country stands for itself."""
  return "+".join(sorted({COUNTRY_REGION.get(c, c) for c in countries if c}))


def population_of(trial: Trial) -> str:
  """Age group (pediatric / adult / older adult / all ages) and sex when restricted."""
  e = trial.eligibility
  if e is None:
    return ""
  lo, hi = e.min_age_years, e.max_age_years
  if hi is not None and hi < 18:
    age = "pediatric"
  elif lo is not None and lo >= 65:
    age = "older adult"
  elif lo is not None and lo >= 18:
    age = "adult"
  elif lo is None and hi is None:
    age = ""
  else:
    age = "all ages"
  sex = {"FEMALE": "female", "MALE": "male"}.get(e.sex, "")
  return ", ".join(x for x in (age, sex) if x)


def size_bucket(enrollment: int | None) -> str:
  """Enrollment as a bucket ('100-299'): sample size is a factor only when it changes scale."""
  if enrollment is None:
    return ""
  return next((name for limit, name in SIZE_BUCKETS if enrollment < limit), ">=1000")


def phase_of(trial: Trial) -> str:
  return "" if trial.phase in ("", "NA") else trial.phase


def drugs_of(arm: Arm | None) -> frozenset[str]:
  """Normalised names of the arm's active interventions (placebo/sham dropped)."""
  if arm is None:
    return frozenset()
  return frozenset(" ".join(_WORD.findall(iv.name.lower())) for iv in arm.interventions
                   if iv.name and not _PLACEBO.search(iv.name))


def dose_of(arm: Arm | None) -> str:
  """'20 mg' when the arm's active interventions state exactly one amount, else ''."""
  if arm is None:
    return ""
  amounts = {(d.amount, d.unit) for iv in arm.interventions if not _PLACEBO.search(iv.name)
             for d in iv.doses if d.amount is not None and d.amount_high is None}
  if len(amounts) != 1:
    return ""
  amount, unit = next(iter(amounts))
  return f"{amount:g} {unit}".strip()


def group_dose(title: str) -> tuple[str, str]:
  """('250 mg', 'twice daily') from a result group's title naming one amount, else ('', '').

  Only the title: group descriptions often give the strength per tablet
  ("2 tablets of 125 mg each"), not the dose.
  """
  amounts = {(d.amount, d.unit, d.frequency) for d in parse_doses(title)
             if d.amount is not None and d.amount_high is None and d.unit != "placebo"}
  if len({(a, u) for a, u, _ in amounts}) != 1:
    return "", ""
  amount, unit, freq = next(iter(amounts))
  return f"{amount:g} {unit}".strip(), (freq if len(amounts) == 1 else "")


def _study_dose(q: Example, arm: Arm | None, label: str) -> tuple[str, str]:
  """(dose, frequency): from the group title when the question names a dose group
  of the arm (its label is the group's title, not the arm's), else the arm's."""
  if arm is not None and label != arm.label and label == q.group_a_title:
    return group_dose(label)
  return dose_of(arm), ""


def comparator_of(arm: Arm | None, label: str) -> str:
  """placebo / active / no intervention, from the comparator arm's type or name."""
  typ = arm.type if arm else ""
  if typ in ("PLACEBO_COMPARATOR", "SHAM_COMPARATOR") or _PLACEBO.search(label):
    return "placebo"
  if typ == "NO_INTERVENTION":
    return "no intervention"
  if typ == "ACTIVE_COMPARATOR":
    return "active"
  if arm is not None and arm.interventions and not any(
      _PLACEBO.search(iv.name) for iv in arm.interventions):
    return "active"
  return ""


def question_arms(q: Example) -> tuple[str, str]:
  """(study arm, comparator): the question's own fields, else read from its options."""
  if q.arm_a or q.arm_b:
    return q.arm_a, q.arm_b
  return arms_from_options(q.options) or ("", "")


def facts_of(q: Example, trial: Trial | None) -> Facts:
  """The factor values of one question, '' where unknown."""
  a_label, b_label = question_arms(q)
  arm_a = find_arm(trial, a_label, q.arm_a_id) if trial and a_label else None
  arm_b = find_arm(trial, b_label, q.arm_b_id) if trial and b_label else None
  dose, freq = _study_dose(q, arm_a, a_label)
  return Facts(
      country=region_of(trial.countries) if trial else "",
      population=population_of(trial) if trial else "",
      phase=phase_of(trial) if trial else "",
      comparator=comparator_of(arm_b, b_label) if b_label else "",
      dose=dose, dose_frequency=freq,
      outcome=q.outcome_title or q.endpoint,
      arm_a=a_label, arm_b=b_label,
      drugs=tuple(sorted(drugs_of(arm_a))),
      condition="; ".join(trial.conditions) if trial else "",
      drug=" + ".join(sorted(drugs_of(arm_a))),
      allocation=trial.allocation if trial else "",
      masking=trial.masking if trial else "",
      sample_size=size_bucket(trial.enrollment) if trial else "")


def attach_facts(questions: Iterable[Example], trials: Mapping[str, Trial]) -> list[Example]:
  """Copies of the questions with `facts` from trials[q.trial_id] (missing trial: all unknown)."""
  return [q.replace(facts=facts_of(q, trials.get(q.trial_id))) for q in questions]


@functools.lru_cache(maxsize=1 << 16)
def _words(text: str) -> frozenset[str]:
  """Cached: anchor choice compares the same few outcome titles millions of times."""
  return frozenset(w for w in _WORD.findall(text.lower()) if w not in _STOP)


@functools.lru_cache(maxsize=1 << 16)
def text_overlap(a: str, b: str) -> float:
  """Word Jaccard of two outcome (or condition) texts, stop words and time words aside."""
  wa, wb = _words(a), _words(b)
  return len(wa & wb) / len(wa | wb) if wa and wb else 0.0


def same_text(a: str, b: str) -> bool:
  """Two outcome (or condition) texts name the same thing: word Jaccard >= 0.5."""
  return text_overlap(a, b) >= OUTCOME_SAME_JACCARD


def compare_facts(anchor: Facts, target: Facts, factors: Sequence[str] = FACTORS
                  ) -> tuple[list[Factor], list[str]]:
  """([Factor that differs, in `factors` order], [factors that cannot be compared]).

  A factor unknown on either side cannot be compared: it is listed, never a step.
  """
  diffs, unknown = [], []
  for f in factors:
    va, vt = getattr(anchor, f), getattr(target, f)
    if not va or not vt:
      unknown.append(f)
    elif (not same_text(va, vt)) if f in TEXT_FACTORS else va != vt:
      diffs.append(Factor(f, va, vt))
  return diffs, unknown
