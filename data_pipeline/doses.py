"""Dose parsing from free text ("240 mg SC once a week", "10 mg/kg IV every 3 weeks").

Dose perturbations need amounts in comparable units, so units are normalised
(milligrams -> mg, µg -> mcg, mg/m² -> mg/m2, ...). Route and frequency are taken
from the words after each amount (up to the next amount). A number followed by a
unit-looking token that is not recognised ("5 mgs") yields no dose and, when a
BuildReport is given, is counted as `dose_unknown_unit`; plain words after numbers
("3 years", "2 tablets") are ignored silently.
"""
from __future__ import annotations

import dataclasses
import re

from data_pipeline.build_report import BuildReport
from data_pipeline.schema import Dose
from data_pipeline.text import clean_text

_BASE_UNITS = {
    "mg": "mg", "mgs": None, "milligram": "mg", "milligrams": "mg",
    "g": "g", "gm": "g", "gms": "g", "gram": "g", "grams": "g",
    "mcg": "mcg", "µg": "mcg", "μg": "mcg", "ug": "mcg", "microgram": "mcg",
    "micrograms": "mcg", "ng": "ng", "nanogram": "ng", "nanograms": "ng",
    "iu": "IU", "international units": "IU", "international unit": "IU",
    "u": "U", "unit": "U", "units": "U", "ml": "mL", "cc": "mL", "milliliter": "mL",
    "milliliters": "mL", "millilitre": "mL", "l": "L", "liter": "L", "litre": "L",
    "mmol": "mmol", "µmol": "µmol", "umol": "µmol", "meq": "mEq", "%": "%", "percent": "%", "cells": "cells",
    "cell": "cells", "gy": "Gy", "cgy": "cGy", "mci": "mCi", "mbq": "MBq", "vp": "vp",
    "pfu": "PFU", "kg": None,
}
_DENOMS = {"kg": "kg", "m2": "m2", "m²": "m2", "m^2": "m2", "sqm": "m2", "ml": "mL",
           "l": "L", "h": "h", "hr": "h", "hour": "h", "min": "min", "dose": "",
           "kilogram": "kg", "fraction": "fraction", "cycle": "cycle", "spray": "spray",
           "dl": "dL", "puff": "puff", "m": "m2", "kgs": "kg"}
_PER_TIME = {"day": "once daily", "d": "once daily", "daily": "once daily",
             "week": "once weekly", "wk": "once weekly"}

_NUM = r"(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?|\.\d+)"
_AMOUNT = re.compile(
    _NUM + r"(?:\s*(?:-|–|to)\s*" + _NUM + r")?"
    r"(?:\s*[x×*]\s*10\s*(?:\^|\*\*|e)?\s*([+-]?\d+))?"
    r"\s*(international units?|[a-zA-Zµμ%][a-zA-Zµμ%]*(?:\s*/\s*[a-zA-Z]+[2²]?(?:\^2)?)*)?",
    flags=re.UNICODE)

# Words that often follow a number but are not dose units.
_NOT_UNITS = {
    "times", "time", "x", "years", "year", "yrs", "y", "weeks", "week", "wks", "days",
    "day", "d", "hours", "hour", "hrs", "hr", "h", "months", "month", "mo", "min",
    "mins", "minutes", "minute", "sec", "seconds", "s", "patients", "subjects",
    "participants", "cycles", "cycle", "doses", "dose", "tablets", "tablet", "tabs",
    "capsules", "capsule", "caps", "pills", "pill", "injections", "injection", "puffs",
    "puff", "drops", "drop", "sessions", "visits", "meals", "cm", "mm", "kg", "of",
    "and", "or", "to", "in", "at", "per", "with", "for", "a", "the", "arms", "groups",
    "st", "nd", "rd", "th", "am", "pm", "bid", "tid", "qid", "qd", "qw", "iv", "sc",
    "im", "po", "vs", "mmhg", "bpm", "m", "km", "f", "c", "b", "t", "fx", "ip",
}

_ROUTES = (
    ("oral", r"\b(oral(ly)?|p\.?o\.?|by mouth|tablets?|capsules?)\b"),
    ("IV", r"\b(intravenous(ly)?|i\.v\.?|iv|infusions?)\b"),
    ("SC", r"\b(subcutaneous(ly)?|s\.c\.?|sc|subq|sq)\b"),
    ("IM", r"\b(intramuscular(ly)?|i\.m\.?|im)\b"),
    ("inhaled", r"\b(inhal(ed|ation|er)|nebuli[sz]ed|nebuli[sz]er)\b"),
    ("intranasal", r"\b(intranasal(ly)?|nasal spray|nasally)\b"),
    ("topical", r"\b(topical(ly)?|cream|ointment|gel)\b"),
    ("transdermal", r"\b(transdermal|patch)\b"),
    ("sublingual", r"\b(sublingual(ly)?)\b"),
    ("intrathecal", r"\b(intrathecal(ly)?)\b"),
    ("intravitreal", r"\b(intravitreal(ly)?)\b"),
    ("intradermal", r"\b(intradermal(ly)?)\b"),
    ("rectal", r"\b(rectal(ly)?|suppositor(y|ies))\b"),
    ("ophthalmic", r"\b(ophthalmic|eye drops?)\b"),
)
_ROUTES_RE = [(name, re.compile(p, re.IGNORECASE)) for name, p in _ROUTES]

_WORDNUM = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
            "other": 2}
_FREQS = (
    (r"\bevery\s+(\d+|one|two|three|four|five|six|other)\s+weeks?\b|\bq(\d+)\s*w(?:ee)?k?s?\b",
     lambda n: "once weekly" if n == 1 else f"every {n} weeks"),
    (r"\bevery\s+(\d+|one|two|three|four|five|six|other)\s+days?\b|\bq(\d+)\s*d\b",
     lambda n: "once daily" if n == 1 else f"every {n} days"),
    (r"\bevery\s+(\d+|one|two|three|four|five|six)\s+months?\b",
     lambda n: "monthly" if n == 1 else f"every {n} months"),
    (r"\bevery\s+(\d+|one|two|three|four|five|six)\s+h(?:ou)?rs?\b|\bq(\d+)\s*h\b",
     lambda n: {24: "once daily", 12: "twice daily", 8: "three times daily",
                6: "four times daily"}.get(n, f"every {n} hours")),
)
_FREQS_RE = [(re.compile(p, re.IGNORECASE), f) for p, f in _FREQS]
_FIXED_FREQS = (
    ("four times daily", r"\b(four|4)\s+times\s+(a\s+|per\s+|each\s+)?da(y|ily)\b|\bq\.?i\.?d\.?\b"),
    ("three times daily",
     r"\b(three|3)\s+times\s+(a\s+|per\s+|each\s+)?da(y|ily)\b|\bt\.?i\.?d\.?\b"),
    ("twice daily", r"\b(twice|two times|2 times)\s+(a\s+|per\s+|each\s+)?da(y|ily)\b"
     r"|\bb\.?i\.?d\.?\b"),
    ("once weekly", r"\b(once|one time)\s+(a\s+|per\s+|each\s+)?week(ly)?\b|\bweekly\b|"
     r"\bq\.?w\.?\b|\bevery\s+week\b|\bper\s+week\b"),
    ("monthly", r"\bmonthly\b|\bonce\s+(a|per)\s+month\b|\bevery\s+month\b"),
    ("once daily", r"\b(once|one time)\s+(a\s+|per\s+|each\s+)?da(y|ily)\b|\bq\.?d\.?\b|"
     r"\bdaily\b|\bevery\s+day\b|\bper\s+day\b|\bq\.?h\.?s\.?\b|\bat\s+bedtime\b"),
    ("single dose", r"\bsingle\s+(dose|injection|infusion|administration)\b|"
     r"\bonce\b(?!\s*-?\s*(every|a|per|daily|weekly|monthly|each|q\d|in))"),
)
_FIXED_RE = [(f, re.compile(p, re.IGNORECASE)) for f, p in _FIXED_FREQS]


def find_route(text: str) -> str:
  for name, rx in _ROUTES_RE:
    if rx.search(text):
      return name
  return ""


def find_frequency(text: str) -> str:
  """The frequency phrase that comes first in `text` ('' if none)."""
  hits = []  # (position, -length, frequency)
  for rx, fmt in _FREQS_RE:
    m = rx.search(text)
    if m:
      g = next(x for x in m.groups() if x)
      hits.append((m.start(), -len(m.group(0)), fmt(_WORDNUM.get(g.lower()) or int(g))))
  for f, rx in _FIXED_RE:
    m = rx.search(text)
    if m:
      hits.append((m.start(), -len(m.group(0)), f))
  return min(hits)[2] if hits else ""


def normalise_unit(token: str) -> tuple[str | None, str]:
  """('mg/kg', '') or (unit, per-time frequency); (None, '') when not a dose unit."""
  t = re.sub(r"\s+", "", token.lower()).rstrip(".")
  if t.startswith("international"):
    return "IU", ""
  parts = t.split("/")
  base = _BASE_UNITS.get(parts[0])
  if base is None:
    return None, ""
  denoms, freq = [], ""
  for p in parts[1:]:
    if p in _PER_TIME:
      freq = _PER_TIME[p]
    elif p in _DENOMS:
      if _DENOMS[p]:
        denoms.append(_DENOMS[p])
    elif len(p) > 3:
      break  # "12.5 mg / hydrochlorothiazide": the next word is a name, not a unit
    else:
      return None, ""
  return "/".join([base] + denoms), freq


def _looks_like_unit(token: str) -> bool:
  t = token.lower().rstrip(".")
  if t in _NOT_UNITS or not t:
    return False
  return "/" in t or (len(t) <= 5 and (token.isupper() or not re.search(r"[aeiouy]", t)))


def parse_doses(text: str, report: BuildReport | None = None, source: str = "doses",
                record_id: str = "") -> tuple[Dose, ...]:
  """All doses mentioned in `text`; placebo-only text -> one Dose(amount=0, unit='placebo')."""
  text = clean_text(text)
  if not text:
    return ()
  found = []  # (start, end, amount, high, unit, per_time_freq, raw)
  for m in _AMOUNT.finditer(text):
    prev = text[max(0, m.start() - 2):m.start()]
    if prev[-1:] in ("x", "×") and prev[:1].isdigit():
      pass  # "2x25mg": the 25 is a dose
    elif prev[-1:] and (prev[-1].isalnum() or prev[-1] in "^."):
      continue  # inside a word or an exponent ("10^6", "A1", "v2.1")
    unit_tok = m.group(4) or ""
    if not unit_tok:
      continue
    unit, per_freq = normalise_unit(unit_tok)
    if unit is None:
      if _looks_like_unit(unit_tok):
        if report is not None:
          report.add_skip(source, "dose_unknown_unit", f"{record_id}:{unit_tok}")
      continue
    lo = float(m.group(1).replace(",", ""))
    hi = float(m.group(2).replace(",", "")) if m.group(2) else None
    if m.group(3):
      scale = 10.0 ** int(m.group(3))
      lo, hi = lo * scale, (hi * scale if hi is not None else None)
    if hi is not None and hi < lo:
      hi = None
    found.append((m.start(), m.end(), lo, hi, unit, per_freq, m.group(0).strip()))
  if not found:
    if re.search(r"\bplacebo\b", text, re.IGNORECASE):
      return (Dose("placebo", 0.0, None, "placebo", find_route(text), find_frequency(text)),)
    return ()
  doses = []
  for i, (start, _, lo, hi, unit, per_freq, raw) in enumerate(found):
    stop = found[i + 1][0] if i + 1 < len(found) else len(text)
    window = text[start:stop]
    route = find_route(window) or (find_route(text) if len(found) == 1 else "")
    freq = per_freq or find_frequency(window) or (
        find_frequency(text) if len(found) == 1 else "")
    doses.append(Dose(raw, lo, hi, unit, route, freq))
  return tuple(doses)


def intervention_doses(name: str, iv_description: str, arm_description: str,
                       arm_iv_names: tuple[str, ...] = (), report: BuildReport | None = None,
                       source: str = "doses", record_id: str = "") -> tuple[Dose, ...]:
  """Doses of intervention `name` within one arm.

  The arm description usually carries the arm-specific dose ("Dupilumab 300 mg
  qw"), so it is preferred: the stretch after the first mention of `name` up to the
  next other intervention's name, or the whole description when the arm has this
  one intervention only. Otherwise the intervention's own description. A placebo
  intervention is always the placebo dose.
  """
  if re.search(r"\bplacebo\b", name, re.IGNORECASE):
    return (Dose("placebo", 0.0, None, "placebo", find_route(arm_description or
                                                              iv_description), ""),)
  doses = _arm_or_iv_doses(name, iv_description, arm_description, arm_iv_names,
                           dict(report=report, source=source, record_id=record_id))
  route = find_route(f"{arm_description} {iv_description}")
  return tuple(d if d.route else dataclasses.replace(d, route=route) for d in doses)


def _arm_or_iv_doses(name, iv_description, arm_description, arm_iv_names, kw):
  arm = clean_text(arm_description)
  if arm:
    low = arm.lower()
    i = low.find(clean_text(name).lower()) if name else -1
    if i >= 0:
      others = [low.find(n.lower(), i + len(name)) for n in arm_iv_names
                if n and n.lower() != name.lower()]
      stop = min([j for j in others if j > i] or [len(arm)])
      d = parse_doses(arm[i:stop], **kw)
      if d:
        return d
    elif len(arm_iv_names) <= 1:
      d = parse_doses(arm, **kw)
      if d:
        return d
  return parse_doses(iv_description, **kw)
