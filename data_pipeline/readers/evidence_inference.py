"""Evidence Inference 2.0 reader: ICO prompts joined with their v2 annotations.

Each prompt gets the majority label of its annotations whose `Valid Label` is not
False; a tie is skipped (`label_tie`). Prompts with no v2 annotation (the 1.0-only
prompts in prompts_merged.csv) are skipped as `no_annotation`. The label spelling
"significantly increase" (sic, in the file) is normalised. Split comes from the
ev2_{train,validation,test}_article_ids.txt lists by PMCID ("" when absent).
"""
from __future__ import annotations

import collections
import csv
import pathlib

from data_pipeline import schema as S
from data_pipeline.build_report import BuildReport

SOURCE = "evidence_inference"
LABELS = ("significantly increased", "significantly decreased", "no significant difference")
_LABEL_FIX = {"significantly increase": "significantly increased",
              "significantly decrease": "significantly decreased"}
PROMPT_FIELDS = ("PromptID", "PMCID", "Outcome", "Intervention", "Comparator")
ANNOT_FIELDS = ("PromptID", "PMCID", "Valid Label", "Label", "Annotations")


def _rows(path: pathlib.Path, fields, report: BuildReport, what: str) -> list[dict]:
  """CSV rows with all `fields` non-empty; short or empty rows are counted and skipped."""
  out = []
  try:
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      missing = [c for c in fields if c not in (reader.fieldnames or [])]
      if missing:
        report.add_skip(SOURCE, f"{what}_missing_column", f"{path.name}:{missing[0]}")
        return []
      for i, row in enumerate(reader):
        if any(row.get(c) is None or not S.clean_text(row.get(c)) for c in fields
               if c not in ("Annotations", "Valid Label")):
          report.add_skip(SOURCE, f"{what}_missing_field", f"{path.name}:row{i + 2}")
          continue
        out.append(row)
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    report.add_skip(SOURCE, "unreadable_file", f"{path}: {type(e).__name__}")
  return out


def _splits(root: pathlib.Path) -> dict[str, str]:
  out = {}
  for split in ("train", "validation", "test"):
    f = root / f"ev2_{split}_article_ids.txt"
    if f.exists():
      for line in f.read_text(encoding="utf-8").split():
        out[line.strip()] = split
  return out


def majority(labels: list[str]) -> str | None:
  """The most common label, or None on a tie for first place."""
  ranked = collections.Counter(labels).most_common()
  if not ranked or (len(ranked) > 1 and ranked[0][1] == ranked[1][1]):
    return None
  return ranked[0][0]


def read_evidence_inference(root, report: BuildReport) -> list[dict]:
  """Plain dicts {prompt_id, pmcid, intervention, comparator, outcome, label, evidence, split}."""
  root = pathlib.Path(root)
  prompts = _rows(root / "prompts_merged.csv", PROMPT_FIELDS, report, "prompt")
  annots = _rows(root / "v2_annotations.csv", ANNOT_FIELDS, report, "annotation")
  by_prompt: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
  for i, a in enumerate(annots):
    label = _LABEL_FIX.get(S.clean_text(a["Label"]).lower(), S.clean_text(a["Label"]).lower())
    if label not in LABELS:
      report.add_skip(SOURCE, "annotation_unknown_label", f"row{i + 2}:{a['Label'][:30]}")
      continue
    if S.clean_text(a.get("Valid Label")).lower() == "false":
      report.add_skip(SOURCE, "annotation_invalid", f"prompt{a['PromptID']}")
      continue
    by_prompt[S.clean_text(a["PromptID"])].append((label, (a.get("Annotations") or "").strip()))
  splits = _splits(root)
  out, seen = [], set()
  for p in prompts:
    pid = S.clean_text(p["PromptID"])
    if pid in seen:
      report.add_skip(SOURCE, "duplicate_prompt", pid)
      continue
    seen.add(pid)
    anns = by_prompt.get(pid)
    if not anns:
      report.add_skip(SOURCE, "no_annotation", pid)
      continue
    label = majority([lab for lab, _ in anns])
    if label is None:
      report.add_skip(SOURCE, "label_tie", pid)
      continue
    pmcid = S.clean_text(p["PMCID"])
    out.append({
        "prompt_id": pid, "pmcid": pmcid, "intervention": S.clean_text(p["Intervention"]),
        "comparator": S.clean_text(p["Comparator"]), "outcome": S.clean_text(p["Outcome"]),
        "label": label, "evidence": next((ev for lab, ev in anns if lab == label and ev), ""),
        "split": splits.get(pmcid, ""),
    })
    report.add_read(SOURCE)
  return out
