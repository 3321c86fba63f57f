"""The normalised trial schema every reader produces (see docs/design.md).

Frozen dataclasses with tuples so a Trial can be hashed, cached and shared between
pair builders without anyone mutating it. Readers build the pieces, then call
`validate_trial`; a record that fails is skipped whole, never half-filled.
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


# Polarity: decided from the outcome title, the description only when the title
# has no cue at all (descriptions often define the measure by its failure modes:
# "response ... until progression"). Only clear words count; a title with both a
# good and a bad cue is 'unknown'. Three structures come before the plain cues:
#   "time to <bad event>" is higher_better, "time to <good event>" lower_better;
#   "<x>-free" (progression-free survival, pain-free) is a good thing;
#   "increase / improvement / worsening / decrease in <x>" turns on what x is.
_GOOD_CUES = (r"respon(se|ses|ders?)", "remission", "survival", "survivors?", "cured?",
              "cure rate", "heal(ing|ed)", "quality of life", "abstinen(ce|t)",
              "seroconver", "seroprotect", "success", "improve(ment|d)", "recovery",
              "recovered", "resolution", "relief", "freeof")
_BAD_CUES = ("mortality", "deaths?", "died", "adverse events?", "adverse reactions?",
             "side effects?", "(cardio|hepato|nephro|neuro|oto)?toxicit", "pain scores?",
             "pain intensity", "hba1c",
             "relapses?", "progression", "recurrence", "hospitali", "exacerbation",
             "infections?", "failure", "worsening", "deterioration", "complications?",
             "rescue medication", "bleeding", "haemorrhage", "hemorrhage", "stroke",
             "myocardial infarction", "fractures?", "hypoglyc", "metasta", "dropouts?")
_GOOD_RE = re.compile(r"\b(" + "|".join(_GOOD_CUES) + r")")
_BAD_RE = re.compile(r"\b(" + "|".join(_BAD_CUES) + r")")
_FREE_RE = re.compile(r"\b(progression|disease|event|relapse|recurrence|metastasis|"
                      r"metastases|pain|seizure|symptom|failure|treatment failure|"
                      r"exacerbation|infection|death|fracture|leukemia|tumou?r)[- ]free\b")
_TIME_TO = re.compile(r"\btime (?:from .*? )?(to|until)\b(.*)")
# Phrases that use a cue word without naming the outcome ("change in BMD in
# response to X", "dose-response").
_NOT_CUES = re.compile(r"\bin response to\b|\bdose[- ]response\b")
_DIRECTION = re.compile(r"\b(increase[sd]?|rise|elevation|improvement|worsening|"
                        r"deterioration|decrease[sd]?|reduction|reduced|decline|loss|drop)"
                        r"\s+(?:in|of|from)\b(.*)")
# A decrease is directional only where the measure counts participants with it
# ("clinically significant decrease in QoL"); a plain "reduction in HbA1c" may be
# reported as a positive magnitude or a negative change, so its sign is unknown.
_EVENT_COUNT = re.compile(r"participants|patients|subjects|number|percentage|proportion|"
                          r"incidence|clinically (significant|meaningful)|≥|>=|at least")


def _cue_polarity(text: str) -> str | None:
  """From plain good/bad words: None when there is no cue, 'unknown' on conflict."""
  good, bad = bool(_GOOD_RE.search(text)), bool(_BAD_RE.search(text))
  if good == bad:
    return "unknown" if good else None
  return "higher_better" if good else "lower_better"


def _text_polarity(text: str) -> str | None:
  """Polarity of one text (title or description); None when it holds no cue."""
  t = _FREE_RE.sub(" freeof ", _NOT_CUES.sub(" ", clean_text(text).lower()))
  m = _TIME_TO.search(t)
  if m:
    rest = _cue_polarity(m.group(2))
    # the time to a bad event should be long, to a good one short
    return {"lower_better": "higher_better", "higher_better": "lower_better"}.get(
        rest, "unknown")
  m = _DIRECTION.search(t)
  if m:
    word, thing = m.group(1), _cue_polarity(m.group(2))
    if thing in ("higher_better", "lower_better"):
      if word == "improvement":
        return "higher_better"
      if word in ("worsening", "deterioration"):
        return "lower_better"
      if word.startswith("increase") or word in ("rise", "elevation"):
        return thing
      if not _EVENT_COUNT.search(t):
        return "unknown"
      return "lower_better" if thing == "higher_better" else "higher_better"
  return _cue_polarity(t)


def infer_polarity(title: str, description: str = "") -> str:
  """'higher_better' / 'lower_better' from the title's cues (else the description's)."""
  pol = _text_polarity(title)
  if pol is None:
    pol = _text_polarity(description)
  return pol or "unknown"


# --- parsing helpers shared by the readers --------------------------------

_SPACES = re.compile(r"[\s\u00a0\u2009\u202f]+")
_NUM = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_QUAL = {"<": "<", ">": ">", "<=": "<=", ">=": ">=", "=": "=", "≤": "<=",
         "≥": ">=", "=<": "<=", "=>": ">=", "<or=": "<=", ">or=": ">="}


def clean_text(s: str | None) -> str:
  """Collapses whitespace (NBSP included); None becomes ''."""
  if s is None:
    return ""
  return _SPACES.sub(" ", s if isinstance(s, str) else str(s)).strip()


def parse_number(s) -> float | None:
  """A finite float from '5,113', ' 0.5 ', '1e-3'; None for 'NA', 'NR', '', '<1'."""
  if s is None:
    return None
  if isinstance(s, (int, float)) and not isinstance(s, bool):
    return float(s) if math.isfinite(s) else None
  t = clean_text(str(s)).replace("\u2212", "-")
  if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", t):
    t = t.replace(",", "")
  if not _NUM.match(t):
    return None
  v = float(t)
  return v if math.isfinite(v) else None


def parse_qualified(s) -> tuple[float | None, str]:
  """'p<0.001', '< .001', 'P = 0.03', '≤0.05' -> (value, qualifier); (None, '') if not a number."""
  t = clean_text(str(s) if s is not None else "").replace("\u2212", "-")
  m = re.match(r"^(?:p\s*(?:-?value)?\s*)?(<\s*or\s*=|>\s*or\s*=|<=|>=|=<|=>|[<>=≤≥])?\s*(.*)$",
               t, flags=re.IGNORECASE)
  if not m:
    return None, ""
  qual = _QUAL[(m.group(1) or "=").replace(" ", "")]
  v = parse_number(m.group(2))
  if v is None:
    return None, ""
  return v, qual


def parse_age_years(s: str | None) -> float | None:
  """'18 Years' -> 18.0, '6 Months' -> 0.5, 'N/A' -> None."""
  m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*(year|month|week|day|hour|minute)s?\b",
               clean_text(s).lower())
  if not m:
    return None
  per_year = {"year": 1.0, "month": 12.0, "week": 52.1775, "day": 365.25,
              "hour": 8766.0, "minute": 525960.0}[m.group(2)]
  return float(m.group(1)) / per_year


def normalise_sex(s: str | None) -> str:
  t = clean_text(s).upper()
  return {"BOTH": "ALL", "ALL": "ALL", "FEMALE": "FEMALE", "MALE": "MALE"}.get(t, "ALL")


def normalise_arm_type(s: str | None) -> str:
  """'Placebo Comparator' -> 'PLACEBO_COMPARATOR'; unknown words -> 'OTHER'."""
  t = re.sub(r"[\s-]+", "_", clean_text(s).upper())
  if not t:
    return ""
  return t if t in ARM_TYPES else "OTHER"


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
  if t.eligibility is not None:
    _check(t.eligibility.sex in SEXES, w, f"sex {t.eligibility.sex!r}")
  return t


class SkipRecord(Exception):
  """Raised by a record parser: the record is skipped and counted under `reason`."""

  def __init__(self, reason: str, message: str = ""):
    super().__init__(f"{reason}: {message}" if message else reason)
    self.reason = reason


# --- construction helpers shared by the registry readers ------------------

_MONTHS = {m: i + 1 for i, m in enumerate(
    ("january", "february", "march", "april", "may", "june", "july", "august",
     "september", "october", "november", "december"))}


def normalise_date(s: str | None) -> str:
  """'September 1, 2006' -> '2006-09-01', 'July 2020' -> '2020-07'; ISO passes through."""
  t = clean_text(s)
  m = re.fullmatch(r"([A-Za-z]+)\s+(?:(\d{1,2}),\s*)?(\d{4})", t)
  if m and m.group(1).lower() in _MONTHS:
    mon = _MONTHS[m.group(1).lower()]
    return f"{m.group(3)}-{mon:02d}" + (f"-{int(m.group(2)):02d}" if m.group(2) else "")
  return t


def normalise_phase(s: str | None) -> str:
  """'Phase 1/Phase 2' -> 'PHASE1/PHASE2', 'N/A' -> 'NA' (API v2 spelling)."""
  t = clean_text(s)
  if not t or t.upper() in ("N/A", "NA"):
    return "NA" if t else ""
  parts = [re.sub(r"\s+", "", p).upper().replace("EARLYPHASE", "EARLY_PHASE")
           for p in t.split("/")]
  return "/".join(parts)


def _norm_label(s: str) -> str:
  return re.sub(r"[^a-z0-9]+", " ", clean_text(s).lower()).strip()


def match_arm_label(title: str, labels: tuple[str, ...] | list[str]) -> str:
  """The protocol arm label a result-group title refers to, or '' if none is clear.

  Exact match after lower-casing and dropping punctuation, else a unique
  containment match either way ("Arm A: Drug" vs "Drug").
  """
  t = _norm_label(title)
  if not t:
    return ""
  exact = [lab for lab in labels if _norm_label(lab) == t]
  if len(exact) == 1:
    return exact[0]
  contained = [lab for lab in labels
               if _norm_label(lab) and (_norm_label(lab) in t or t in _norm_label(lab))]
  return contained[0] if len(contained) == 1 else ""


def match_arm(title: str, description: str, arms) -> str:
  """Like match_arm_label, then by description: result groups often copy the arm's
  description verbatim under a different title. `arms` holds Arm objects."""
  lab = match_arm_label(title, [a.label for a in arms])
  if lab:
    return lab
  d = _norm_label(description)
  if not d:
    return ""
  hits = [a.label for a in arms if len(_norm_label(a.description)) > 10 and
          (_norm_label(a.description) in d or d in _norm_label(a.description))]
  return hits[0] if len(hits) == 1 else ""


def unique(items) -> tuple[str, ...]:
  """Order-preserving de-duplication of non-empty cleaned strings."""
  out = []
  for x in items:
    x = clean_text(x)
    if x and x not in out:
      out.append(x)
  return tuple(out)
