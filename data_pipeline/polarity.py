"""Outcome polarity: is a higher value of the measure better or worse?

Decided from the outcome title, the description only when the title has no cue
at all (descriptions often define the measure by its failure modes: "response ...
until progression"). Only clear words count; a title with both a good and a bad
cue is 'unknown'. Three structures come before the plain cues:
  "time to <bad event>" is higher_better, "time to <good event>" lower_better;
  "<x>-free" (progression-free survival, pain-free) is a good thing;
  "increase / improvement / worsening / decrease in <x>" turns on what x is.
"""
from __future__ import annotations

import re

from data_pipeline.text import clean_text

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
_TIME = re.compile(r"\btime ")
_TO = re.compile(r"(to|until)\b")
_SPACE_TO = re.compile(r" (to|until)\b")
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


def _time_to(t: str) -> str | None:
  """What follows 'time [from ...] to|until' in `t` (newline-free), as
  r"\btime (?:from .*? )?(to|until)\b(.*)" finds it, in linear time: that regex
  rescans the rest of the text from every 'time from' (18 s for an 80 KB title)."""
  for m in _TIME.finditer(t):
    if t.startswith("from ", m.end()):
      to = _SPACE_TO.search(t, m.end() + 5)
      if to is None:
        return None  # no later 'time' can reach a 'to' either
      return t[to.end():]
    to = _TO.match(t, m.end())
    if to:
      return t[to.end():]
  return None


def _cue_polarity(text: str) -> str | None:
  """From plain good/bad words: None when there is no cue, 'unknown' on conflict."""
  good, bad = bool(_GOOD_RE.search(text)), bool(_BAD_RE.search(text))
  if good == bad:
    return "unknown" if good else None
  return "higher_better" if good else "lower_better"


def _text_polarity(text: str) -> str | None:
  """Polarity of one text (title or description); None when it holds no cue."""
  t = _FREE_RE.sub(" freeof ", _NOT_CUES.sub(" ", clean_text(text).lower()))
  after = _time_to(t)
  if after is not None:
    rest = _cue_polarity(after)
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
