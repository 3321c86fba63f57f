"""The normalised trial schema every reader produces (see docs/design.md), and its validation.

Frozen dataclasses with tuples so a Trial can be hashed, cached and shared between
pair builders without anyone mutating it. Readers build the pieces, then call
`validate_trial`; a record that fails is skipped whole, never half-filled.
Parsing helpers live in text.py, outcome polarity in polarity.py, arm matching in
arms.py.
"""
from __future__ import annotations

import dataclasses
import math
import re

ARM_TYPES = ("EXPERIMENTAL", "ACTIVE_COMPARATOR", "PLACEBO_COMPARATOR",
             "SHAM_COMPARATOR", "NO_INTERVENTION", "OTHER", "")
OUTCOME_TYPES = ("primary", "secondary", "other")
POLARITIES = ("higher_better", "lower_better", "unknown")
QUALIFIERS = ("=", "<", "<=", ">", ">=")
SEXES = ("ALL", "FEMALE", "MALE")
ALLOCATIONS = ("RANDOMIZED", "NON_RANDOMIZED", "NA", "")
MASKINGS = ("NONE", "SINGLE", "DOUBLE", "TRIPLE", "QUADRUPLE", "")


_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class SchemaError(ValueError):
  """A record that cannot become a valid Trial; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Dose:
  text: str
  amount: float | None
  amount_high: float | None
  unit: str
  route: str
  frequency: str


@dataclasses.dataclass(frozen=True)
class Intervention:
  name: str
  type: str
  description: str
  doses: tuple[Dose, ...] = ()


@dataclasses.dataclass(frozen=True)
class Arm:
  id: str
  label: str
  type: str
  description: str
  interventions: tuple[Intervention, ...] = ()


@dataclasses.dataclass(frozen=True)
class ArmValue:
  arm_id: str
  arm_label: str
  value: float | None
  value_qualifier: str = "="
  dispersion_type: str = ""
  dispersion: float | None = None
  ci_low: float | None = None
  ci_high: float | None = None
  n: int | None = None
  # The result group's own title ("GSK189075 250 mg QD"): several groups can map
  # to one protocol arm label (dose groups of one arm), and only this tells them apart.
  group_title: str = ""


@dataclasses.dataclass(frozen=True)
class Analysis:
  arm_ids: tuple[str, ...]
  p_value: float | None
  p_qualifier: str
  method: str
  param_type: str
  estimate: float | None
  ci_low: float | None
  ci_high: float | None
  ci_pct: float | None
  non_inferiority: str


@dataclasses.dataclass(frozen=True)
class Outcome:
  title: str
  description: str
  type: str
  time_frame: str
  unit: str
  param_type: str
  values: tuple[ArmValue, ...] = ()
  analyses: tuple[Analysis, ...] = ()
  polarity: str = "unknown"


@dataclasses.dataclass(frozen=True)
class Eligibility:
  sex: str
  min_age_years: float | None
  max_age_years: float | None
  criteria: str


@dataclasses.dataclass(frozen=True)
class Trial:
  id: str
  source: str
  title: str
  phase: str
  conditions: tuple[str, ...]
  countries: tuple[str, ...]
  enrollment: int | None
  start_date: str
  completion_date: str
  arms: tuple[Arm, ...]
  outcomes: tuple[Outcome, ...]
  eligibility: Eligibility | None
  allocation: str = ""  # RANDOMIZED | NON_RANDOMIZED | NA | "" (unknown)
  masking: str = ""  # NONE | SINGLE | DOUBLE | TRIPLE | QUADRUPLE | "" (unknown)
  # ISO date the results became public (the registry's results-first-posted date; for
  # CT Open the release's cutoff, set by the build): the time rule of anchors reads it.
  results_posted: str = ""



def _check(cond: bool, where: str, msg: str):
  if not cond:
    raise SchemaError(f"{where}: {msg}")


def _finite_or_none(x, where):
  _check(x is None or (isinstance(x, float) and math.isfinite(x)), where,
         f"expected a finite float or None, got {x!r}")


def validate_trial(t: Trial) -> Trial:
  """Raises SchemaError naming the trial and field; returns the trial unchanged."""
  w = f"trial {t.id or '?'}"
  _check(bool(t.id), w, "empty id")
  _check(bool(t.source), w, "empty source")
  for name in ("conditions", "countries", "arms", "outcomes"):
    _check(isinstance(getattr(t, name), tuple), w, f"{name} must be a tuple")
  _check(t.enrollment is None or (isinstance(t.enrollment, int) and t.enrollment >= 0),
         w, f"enrollment {t.enrollment!r}")
  for a in t.arms:
    _check(a.type in ARM_TYPES, w, f"arm {a.label!r} type {a.type!r}")
    _check(isinstance(a.interventions, tuple), w, f"arm {a.label!r} interventions")
    for iv in a.interventions:
      _check(isinstance(iv.doses, tuple), w, f"intervention {iv.name!r} doses")
  for o in t.outcomes:
    ow = f"{w} outcome {o.title[:60]!r}"
    _check(bool(o.title), w, "outcome with empty title")
    _check(o.type in OUTCOME_TYPES, ow, f"type {o.type!r}")
    _check(o.polarity in POLARITIES, ow, f"polarity {o.polarity!r}")
    _check(isinstance(o.values, tuple) and isinstance(o.analyses, tuple), ow,
           "values/analyses must be tuples")
    for v in o.values:
      for f in ("value", "dispersion", "ci_low", "ci_high"):
        _finite_or_none(getattr(v, f), f"{ow} value {v.arm_id} {f}")
      _check(v.value_qualifier in QUALIFIERS, ow, f"qualifier {v.value_qualifier!r}")
    for an in o.analyses:
      _check(isinstance(an.arm_ids, tuple), ow, "analysis arm_ids must be a tuple")
      _finite_or_none(an.p_value, f"{ow} p_value")
      _check(an.p_value is None or 0.0 <= an.p_value <= 1.0, ow, f"p_value {an.p_value}")
      _check(an.p_value is None or an.p_qualifier in QUALIFIERS, ow,
             f"p_qualifier {an.p_qualifier!r}")
  _check(t.allocation in ALLOCATIONS, w, f"allocation {t.allocation!r}")
  _check(t.masking in MASKINGS, w, f"masking {t.masking!r}")
  _check(t.results_posted == "" or _ISO_DATE.fullmatch(t.results_posted) is not None, w,
         f"results_posted {t.results_posted!r} is not YYYY-MM-DD")
  if t.eligibility is not None:
    _check(t.eligibility.sex in SEXES, w, f"sex {t.eligibility.sex!r}")
  return t
