"""Text, number, date and code-list parsing shared by the readers.

Registry text comes with NBSP and thin spaces, thousands separators, qualified
numbers ("p<0.001"), free-form ages and dates; each helper turns one such field
into the schema's normalised form, or None / '' when it cannot.
"""
from __future__ import annotations

import math
import re

from data_pipeline.schema import ARM_TYPES

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


def normalise_allocation(s: str | None) -> str:
  """'Randomized' / 'RANDOMIZED' -> 'RANDOMIZED', 'Non-Randomized' -> 'NON_RANDOMIZED',
  'N/A' -> 'NA'; anything else -> '' (unknown)."""
  t = re.sub(r"[\s-]+", "_", clean_text(s).upper()).replace("N/A", "NA")
  return t if t in ("RANDOMIZED", "NON_RANDOMIZED", "NA") else ""


def normalise_masking(s: str | None) -> str:
  """'Double (Participant, Investigator)' / 'DOUBLE' -> 'DOUBLE'; 'None (Open Label)' -> 'NONE'."""
  first = clean_text(s).split(" ", 1)[0].upper()
  return first if first in ("NONE", "SINGLE", "DOUBLE", "TRIPLE", "QUADRUPLE") else ""


def iso_date(s: str | None) -> str:
  """A full date as YYYY-MM-DD ('March 19, 2015' or '2015-03-19'), else '' (a month
  alone is not a day before which something was public)."""
  t = normalise_date(s)
  return t if re.fullmatch(r"\d{4}-\d{2}-\d{2}", t) else ""


def normalise_phase(s: str | None) -> str:
  """'Phase 1/Phase 2' -> 'PHASE1/PHASE2', 'N/A' -> 'NA' (API v2 spelling)."""
  t = clean_text(s)
  if not t or t.upper() in ("N/A", "NA"):
    return "NA" if t else ""
  parts = [re.sub(r"\s+", "", p).upper().replace("EARLYPHASE", "EARLY_PHASE")
           for p in t.split("/")]
  return "/".join(parts)


def unique(items) -> tuple[str, ...]:
  """Order-preserving de-duplication of non-empty cleaned strings."""
  out = []
  for x in items:
    x = clean_text(x)
    if x and x not in out:
      out.append(x)
  return tuple(out)
