"""A data root for the tests, built from the repo's own files only.

The repo carries a public-domain ClinicalTrials.gov sample (data_pipeline/embedded/) and
never CT Open (no licence). Tests that need CT Open's pickle format get small files
written here in that format, one entry per (trial, endpoint) as the benchmark keys them,
from the generated trial world (data_pipeline/world.py: questions in CT Open's three
categories and wording, from results drawn by a hidden mechanism). Evidence Inference's
CSV layout is written the same way from a handful of hand-made rows. The same root is
built whether or not ../shared/data exists, so the suite behaves the same on a fresh clone.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import pathlib
import pickle
import shutil

from configs import world as world_config
from data_pipeline import data_root as dr
from data_pipeline import questions
from data_pipeline.world import WorldConfig, generate_world

# World trials go to a CT Open-format release by a hash of their id (the rest are unused).
RELEASES = {"Winter_2025": (0.0, 0.55), "Summer_2025": (0.55, 1.0)}
_OUTCOME_TYPE = {"primary": "primaryOutcomes", "secondary": "secondaryOutcomes"}
_META = {"superiority": "distinguishable_arm", "comparative": "distinguishable_arm",
         "endpoint_met": "no_arm"}


def release_of(trial_id: str) -> str:
  u = int(hashlib.sha256(trial_id.encode()).hexdigest()[:8], 16) / 16**8
  return next(rel for rel, (lo, hi) in RELEASES.items() if lo <= u < hi)


def _arm_object(arm) -> dict:
  """An API v2 arm-group object, as CT Open stores them."""
  return {"label": arm.label, "type": arm.type, "description": arm.description,
          "interventionNames": [f"{iv.type.title()}: {iv.name}" for iv in arm.interventions],
          "interventions": [{"name": iv.name, "type": iv.type, "description": iv.description}
                            for iv in arm.interventions]}


def ct_open_release(trials) -> dict:
  """{(nct_id, endpoint_str): entry} in CT Open's pickle layout from registry trials."""
  out = {}
  for i, trial in enumerate(trials):
    by_outcome: dict[str, list] = {}
    for q in questions.derive_all([trial]):
      if q.question_type in _META:
        by_outcome.setdefault(q.outcome_title, []).append(q)
    for k, (title, qs) in enumerate(by_outcome.items()):
      outcome = next(o for o in trial.outcomes if o.title == title)
      endpoint = str({"measure": title, "description": outcome.description,
                      "timeFrame": outcome.time_frame,
                      "outcome_type": _OUTCOME_TYPE.get(outcome.type, "otherOutcomes")})
      if len({_META[q.question_type] for q in qs}) > 1:  # one meta label per endpoint
        keep = "no_arm" if (i + k) % 2 else "distinguishable_arm"  # alternate: both categories
        qs = [q for q in qs if _META[q.question_type] == keep]
      out[(trial.id, endpoint)] = {
          "brief_title": trial.title, "endpoint": endpoint,
          "arms": [_arm_object(a) for a in trial.arms],
          "meta_label": _META[qs[0].question_type],
          "question_list_of_lists": [list(q.options) for q in qs],
          "answer_list_of_lists": [q.options[q.label] for q in qs],
          "list_of_tuples": [], "reported_results": "", "listed_arms": [], "real_arm": ""}
  return out


EVIDENCE_ROWS = (  # (prompt id, pmcid, intervention, comparator, outcome, label)
    ("1", "PMC100", "metformin 1000 mg", "placebo", "HbA1c at 24 weeks",
     "significantly decreased"),
    ("2", "PMC100", "metformin 1000 mg", "placebo", "body weight", "no significant difference"),
    ("3", "PMC200", "exercise programme", "usual care", "VO2 max", "significantly increased"),
    ("4", "PMC300", "drug A 10 mg", "drug A 40 mg", "adverse events",
     "no significant difference"),
    ("5", "PMC300", "drug A 40 mg", "placebo", "pain score", "significantly decreased"),
    ("6", "PMC400", "vitamin D", "placebo", "fracture rate", "no significant difference"),
)


def write_evidence_inference(dest: pathlib.Path) -> None:
  """Evidence Inference 2.0's file layout with EVIDENCE_ROWS (one annotation each)."""
  dest.mkdir(parents=True, exist_ok=True)
  with open(dest / "prompts_merged.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["PromptID", "PMCID", "Outcome", "Intervention", "Comparator"])
    for pid, pmc, iv, comp, out, _ in EVIDENCE_ROWS:
      w.writerow([pid, pmc, out, iv, comp])
  with open(dest / "v2_annotations.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["UserID", "PromptID", "PMCID", "Valid Label", "Valid Reasoning", "Label",
                "Annotations", "Label Code", "In Abstract", "Evidence Start", "Evidence End"])
    for pid, pmc, iv, comp, out, label in EVIDENCE_ROWS:
      w.writerow(["0", pid, pmc, "True", "True", label,
                  f"{iv} versus {comp}: {label} in {out}.", "0", "True", "0", "10"])
  splits = {"train": ("PMC100", "PMC200", "PMC300"), "validation": ("PMC400",), "test": ()}
  for split, ids in splits.items():
    (dest / f"ev2_{split}_article_ids.txt").write_text("".join(f"{i}\n" for i in ids))


def make_data_root(dest: pathlib.Path) -> pathlib.Path:
  """The tests' data root: the embedded registry sample, CT Open-format releases of a
  generated world, and Evidence Inference-format CSVs."""
  src = dr.embedded_root(dest.parent / "embedded-cache")
  for folder in ("ctgov_xml", "ctgov_json"):
    shutil.copytree(src / folder, dest / folder)
  cfg = WorldConfig(**dict(world_config.get_config("quick").world))
  world = generate_world(dataclasses.replace(cfg, seed=7))
  by_release: dict[str, list] = {rel: [] for rel in RELEASES}
  for trial in world.trials:
    by_release[release_of(trial.id)].append(trial)
  (dest / "ct_open").mkdir()
  for rel, trials in by_release.items():
    with open(dest / "ct_open" / f"{rel}.pickle", "wb") as f:
      pickle.dump(ct_open_release(trials), f, protocol=4)
  write_evidence_inference(dest / "evidence_inference")
  return dest
