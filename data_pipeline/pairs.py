"""Counterfactual pairs: an anchor with a known result, a target one factor away.

Natural pairs come from inside one trial, where everything but the changed factor
is the same by construction: dose-ranging arms (same drug, different dose, same
comparator), paired outcomes (same arms, another endpoint), comparator changes
(same arm, another comparator). Approximate pairs come from similar trials
(retrieval.TrialIndex) and are kept only when the anchor and the target differ
in exactly one main factor (FACTORS) and agree on the rest; a factor unknown on
both sides counts as agreeing and is listed in `unknown_factors`, a factor known
on one side only rejects the pair. Chains order several one-factor steps.

Every question first gets `facts` (attach_facts): the factor values read from
its Trial, so pairing never looks a trial up again.
"""
from __future__ import annotations

import collections
import itertools
import re
from typing import Iterable, Mapping, Sequence

from data_pipeline import templates
from data_pipeline.build_report import BuildReport
from data_pipeline.doses import parse_doses
from data_pipeline.questions import arms_from_options
from data_pipeline.retrieval import TrialIndex
from data_pipeline.schema import Arm, Trial, match_arm_label

# Step order of a chain: setting first, then who, then what is compared.
FACTORS = ("country", "population", "phase", "comparator", "dose", "outcome")
APPROX_FACTORS = ("country", "phase", "dose", "population", "comparator")

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


# --- facts --------------------------------------------------------------------

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


def phase_of(trial: Trial) -> str:
  return "" if trial.phase in ("", "NA") else trial.phase


def find_arm(trial: Trial, label: str, arm_id: str = "") -> Arm | None:
  for arm in trial.arms:
    if (arm_id and arm.id == arm_id) or arm.label == label:
      return arm
  m = match_arm_label(label, [a.label for a in trial.arms])
  return next((a for a in trial.arms if a.label == m), None) if m else None


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


def _dose_fact(q: dict, arm: Arm | None, label: str, side: str) -> tuple[str, str]:
  """(dose, frequency): from the group title when the question names a dose group
  of the arm (its label is the group's title, not the arm's), else the arm's."""
  if arm is not None and label != arm.label and label == q.get(f"group_{side}_title"):
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


def question_arms(q: dict) -> tuple[str, str]:
  if q.get("arm_a") or q.get("arm_b"):
    return q.get("arm_a", ""), q.get("arm_b", "")
  return arms_from_options(q["options"]) or ("", "")


def outcome_of(q: dict) -> str:
  """The endpoint's title: `outcome_title`, CT Open's endpoint['measure'], or the text."""
  e = q.get("endpoint", "")
  return q.get("outcome_title") or (e.get("measure", "") if isinstance(e, dict) else str(e))


def facts_of(q: dict, trial: Trial | None) -> dict:
  """The factor values of one question, '' where unknown."""
  a_label, b_label = question_arms(q)
  arm_a = find_arm(trial, a_label, q.get("arm_a_id", "")) if trial and a_label else None
  arm_b = find_arm(trial, b_label, q.get("arm_b_id", "")) if trial and b_label else None
  dose, freq = _dose_fact(q, arm_a, a_label, "a")
  return {
      "country": region_of(trial.countries) if trial else "",
      "population": population_of(trial) if trial else "",
      "phase": phase_of(trial) if trial else "",
      "comparator": comparator_of(arm_b, b_label) if b_label else "",
      "dose": dose, "dose_frequency": freq,
      "outcome": outcome_of(q),
      "arm_a": a_label, "arm_b": b_label,
      "drugs": sorted(drugs_of(arm_a)),
  }


def attach_facts(questions: Iterable[dict], trials: Mapping[str, Trial]) -> list[dict]:
  """Sets q['facts'] from trials[q['trial_id']] (missing trial: all unknown)."""
  out = []
  for q in questions:
    q["facts"] = facts_of(q, trials.get(q["trial_id"]))
    out.append(q)
  return out


def _outcome_words(text: str) -> set[str]:
  return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def same_outcome(a: str, b: str) -> bool:
  wa, wb = _outcome_words(a), _outcome_words(b)
  return bool(wa and wb) and len(wa & wb) / len(wa | wb) >= OUTCOME_SAME_JACCARD


def compare_facts(anchor: dict, target: dict, factors=FACTORS):
  """([{factor, anchor_value, target_value}] that differ, [unknown on both]) or None.

  None when a factor is known on one side only: the pair cannot be checked.
  """
  fa, ft = anchor["facts"], target["facts"]
  diffs, unknown = [], []
  for f in factors:
    va, vt = fa.get(f, ""), ft.get(f, "")
    if not va and not vt:
      unknown.append(f)
      continue
    if not va or not vt:
      return None
    differ = not same_outcome(va, vt) if f == "outcome" else va != vt
    if differ:
      diffs.append({"factor": f, "anchor_value": va, "target_value": vt})
  return diffs, unknown


# --- examples -----------------------------------------------------------------

_ANCHOR_KEYS = ("id", "trial_id", "title", "endpoint", "arms", "arms_text", "options", "label",
                "question_type")


def make_pair(anchor: dict, target: dict, kind: str, factors: list[dict], **extra) -> dict:
  """A pair Example: the target's question and label, the anchor with its answer."""
  ex = {k: v for k, v in target.items() if k not in ("facts",)}
  ex.update(
      id=f"{kind}:{anchor['id']}->{target['id']}",
      kind=kind,
      perturbation="+".join(sorted({f["factor"] for f in factors})),
      anchor_trial_id=anchor["trial_id"],
      anchor={k: anchor.get(k) for k in _ANCHOR_KEYS},
      factors=factors,
      prompt="", completion="", split="",
      **extra)
  return templates.render(ex)


def _qtype(q: dict) -> str:
  return q.get("question_type") or f"{len(q['options'])}-way"


def natural_pairs(questions: Sequence[dict], report: BuildReport | None = None,
                  max_anchors: int = 3) -> list[dict]:
  """Pairs inside one trial: paired outcomes, comparator changes, dose-ranging arms.

  Questions need `facts` (attach_facts). Each target keeps at most `max_anchors`
  anchors per perturbation type, the first in question order.
  """
  by_trial = collections.defaultdict(list)
  for q in questions:
    by_trial[(q["trial_id"], _qtype(q))].append(q)
  out = []
  for (_, _), qs in sorted(by_trial.items()):
    for target in qs:
      used = collections.Counter()
      for anchor in qs:
        if anchor is target or anchor["id"] == target["id"]:
          continue
        ptype = _natural_type(anchor, target)
        if ptype is None or used[ptype] >= max_anchors:
          continue
        fa, ft = anchor["facts"], target["facts"]
        key = {"outcome": "outcome", "comparator": "arm_b", "dose": "dose"}[ptype]
        factor = {"factor": ptype, "anchor_value": fa[key], "target_value": ft[key]}
        out.append(make_pair(anchor, target, "natural_pair", [factor]))
        used[ptype] += 1
        if report is not None:
          report.add_read(f"pairs:natural_pair:{ptype}")
  return out


def _natural_type(a: dict, t: dict) -> str | None:
  fa, ft = a["facts"], t["facts"]
  same_arms = (fa["arm_a"], fa["arm_b"]) == (ft["arm_a"], ft["arm_b"])
  same_options = a["options"] == t["options"]
  outcome_differs = fa["outcome"] != ft["outcome"]
  if outcome_differs and (same_options or (same_arms and fa["arm_a"])):
    return "outcome"
  if outcome_differs or not fa["arm_a"] or not ft["arm_a"]:
    return None
  if fa["arm_a"] == ft["arm_a"] and fa["arm_b"] != ft["arm_b"] and fa["arm_b"] and ft["arm_b"]:
    return "comparator"
  if (fa["arm_b"] == ft["arm_b"] and fa["arm_a"] != ft["arm_a"]
      and set(fa["drugs"]) & set(ft["drugs"]) and fa["dose"] and ft["dose"]
      and fa["dose"].split(" ", 1)[1:] == ft["dose"].split(" ", 1)[1:]
      and fa["dose"] != ft["dose"]
      and fa.get("dose_frequency", "") == ft.get("dose_frequency", "")):
    return "dose"
  return None


def _comparable(anchor: dict, target: dict) -> bool:
  """Cross-trial anchors must ask the same kind of question about the same drugs.

  The study arm's active intervention names must be equal as sets: a shared drug
  with different partners ("X + A" vs "X + B") would be a second changed factor.
  """
  if _qtype(anchor) != _qtype(target) or len(anchor["options"]) != len(target["options"]):
    return False
  da, dt = set(anchor["facts"]["drugs"]), set(target["facts"]["drugs"])
  if da or dt:
    return da == dt
  return anchor["facts"]["arm_a"] == "" and target["facts"]["arm_a"] == ""


def approximate_pairs(questions: Sequence[dict], index: TrialIndex, k: int = 10,
                      report: BuildReport | None = None, max_anchors: int = 3) -> list[dict]:
  """Cross-trial pairs among the k most similar trials, differing in exactly one factor.

  The outcome must match (same_outcome) so the one recorded factor is the only
  main difference; the cosine similarity of the two trials is kept.
  """
  by_trial = collections.defaultdict(list)
  for q in questions:
    by_trial[q["trial_id"]].append(q)
  out = []
  near = _NearestCache(index, k)
  for target in questions:
    n = 0
    if target["trial_id"] not in index:
      continue
    for tid, score in near(target["trial_id"]):
      for anchor in by_trial.get(tid, ()):
        if n >= max_anchors or not _comparable(anchor, target):
          continue
        cmp = compare_facts(anchor, target, APPROX_FACTORS + ("outcome",))
        if cmp is None:
          continue
        diffs, unknown = cmp
        if len(diffs) != 1 or diffs[0]["factor"] == "outcome":
          continue
        out.append(make_pair(anchor, target, "approximate_pair", diffs,
                             unknown_factors=unknown, similarity=round(score, 4)))
        n += 1
        if report is not None:
          report.add_read(f"pairs:approximate_pair:{diffs[0]['factor']}")
  return out


def build_chains(target: dict, anchors: Sequence[dict], k: int,
                 report: BuildReport | None = None) -> list[dict]:
  """Up to k chain Examples for `target`: fewest steps first, then anchor id.

  Each chain lists, in FACTORS order, every factor that differs between the
  anchor and the target (value before -> after); anchors that cannot be compared
  factor by factor, or that do not differ at all, are left out.
  """
  cands = []
  for anchor in anchors:
    if anchor["trial_id"] == target["trial_id"] or not _comparable(anchor, target):
      continue
    cmp = compare_facts(anchor, target, FACTORS)
    if cmp is None or not cmp[0]:
      continue
    cands.append((len(cmp[0]), anchor["id"], anchor, cmp))
  cands.sort(key=lambda c: (c[0], c[1]))
  out = []
  for _, _, anchor, (steps, unknown) in cands[:k]:
    out.append(make_pair(anchor, target, "chain", steps, unknown_factors=unknown))
    if report is not None:
      report.add_read(f"pairs:chain:{len(steps)}_steps")
  return out


def all_chains(questions: Sequence[dict], index: TrialIndex, k: int = 2, n_neighbours: int = 10,
               report: BuildReport | None = None) -> list[dict]:
  """build_chains for every question, anchors drawn from its nearest trials."""
  by_trial = collections.defaultdict(list)
  for q in questions:
    by_trial[q["trial_id"]].append(q)
  out = []
  near = _NearestCache(index, n_neighbours)
  anchors_of: dict[str, list[dict]] = {}
  for target in questions:
    tid = target["trial_id"]
    if tid not in index:
      continue
    if tid not in anchors_of:
      anchors_of[tid] = list(itertools.chain.from_iterable(
          by_trial.get(t, ()) for t, _ in near(tid)))
    out.extend(build_chains(target, anchors_of[tid], k, report))
  return out


class _NearestCache:
  """index.nearest per trial id, computed once: a trial has many questions."""

  def __init__(self, index: TrialIndex, k: int):
    self.index, self.k, self.memo = index, k, {}

  def __call__(self, trial_id: str) -> list[tuple[str, float]]:
    if trial_id not in self.memo:
      self.memo[trial_id] = self.index.nearest(trial_id, self.k)
    return self.memo[trial_id]
