"""Arm matching: which protocol arm a result group's title (or description) names."""
from __future__ import annotations

import re

from data_pipeline.text import clean_text


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


def find_arm(trial, label: str, arm_id: str = ""):
  """The Arm of `trial` with this id or label, else the one its label matches (or None)."""
  for arm in trial.arms:
    if (arm_id and arm.id == arm_id) or arm.label == label:
      return arm
  m = match_arm_label(label, [a.label for a in trial.arms])
  return next((a for a in trial.arms if a.label == m), None) if m else None
