"""Evidence Inference 2.0 reader: ICO prompts joined with their v2 annotations.

Each prompt gets the majority label of its annotations whose `Valid Label` is not
False; a tie is skipped (`label_tie`). Prompts with no v2 annotation (the 1.0-only
prompts in prompts_merged.csv) are skipped as `no_annotation`. The label spelling
"significantly increase" (sic, in the file) is normalised. Split comes from the
ev2_{train,validation,test}_article_ids.txt lists by PMCID ("" when absent).
`question(row)` turns a row into a plain 3-option question Example.
"""
from __future__ import annotations

import collections
import csv
import pathlib

from data_pipeline.build_report import BuildReport
from data_pipeline.example import Example
from data_pipeline.readers.loop import SkipRecord, read_files
from data_pipeline.text import clean_text

SOURCE = "evidence_inference"
LABELS = ("significantly increased", "significantly decreased", "no significant difference")
_LABEL_FIX = {"significantly increase": "significantly increased",
              "significantly decrease": "significantly decreased"}
PROMPT_FIELDS = ("PromptID", "PMCID", "Outcome", "Intervention", "Comparator")
ANNOT_FIELDS = ("PromptID", "PMCID", "Valid Label", "Label", "Annotations")
_OPTIONAL = ("Annotations", "Valid Label")


def _csv_loader(fields, what: str, id_prefix: str):
  """load(path) -> [(row id, row)]; a missing column or an unreadable file skips the file.
  A row's id is id_prefix + its PromptID, else its file and line."""
  def load(path: pathlib.Path):
    try:
      with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in fields if c not in (reader.fieldnames or [])]
        if missing:
          raise SkipRecord(f"{what}_missing_column", f"{path.name}:{missing[0]}")
        rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
      raise SkipRecord("unreadable_file", type(e).__name__) from e
    out = []
    for i, row in enumerate(rows):
      pid = clean_text(row.get("PromptID"))
      out.append((f"{id_prefix}{pid}" if pid else f"{path.name}:row{i + 2}", row))
    return out
  return load


def _rows(rows: list, _) -> list:
  return rows  # the loader already gives (row id, row) pairs


def _require(row: dict, fields, what: str) -> dict:
  """The row, or SkipRecord when a required field is absent or blank (a short row)."""
  if any(row.get(c) is None or not clean_text(row.get(c)) for c in fields if c not in _OPTIONAL):
    raise SkipRecord(f"{what}_missing_field")
  return row


def _annotation(row: dict, _) -> list[tuple[str, str, str]]:
  """(prompt id, label, evidence) of one valid annotation row."""
  _require(row, ANNOT_FIELDS, "annotation")
  label = _LABEL_FIX.get(clean_text(row["Label"]).lower(), clean_text(row["Label"]).lower())
  if label not in LABELS:
    raise SkipRecord("annotation_unknown_label")
  if clean_text(row.get("Valid Label")).lower() == "false":
    raise SkipRecord("annotation_invalid")
  return [(clean_text(row["PromptID"]), label, (row.get("Annotations") or "").strip())]


def _splits(root: pathlib.Path, report: BuildReport) -> dict[str, str]:
  """PMCID -> split from the ev2_*_article_ids.txt files; an unreadable file (bad bytes, a
  folder in its place) is counted under `bad_split_file` and its articles get no split."""
  out = {}
  for split in ("train", "validation", "test"):
    f = root / f"ev2_{split}_article_ids.txt"
    if not f.exists():
      continue
    try:
      ids = f.read_text(encoding="utf-8").split()
    except (UnicodeDecodeError, OSError) as e:
      report.add_skip(SOURCE, "bad_split_file", f"{f.name}: {type(e).__name__}")
      continue
    for line in ids:
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
  by_prompt: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
  for pid, label, evidence in read_files(
      root / "v2_annotations.csv", ".csv", SOURCE, report, count_read=False,
      load=_csv_loader(ANNOT_FIELDS, "annotation", "prompt"), records=_rows, parse=_annotation):
    by_prompt[pid].append((label, evidence))
  splits = _splits(root, report)
  seen: set[str] = set()

  def prompt(row: dict, _) -> list[dict]:
    pid = clean_text(_require(row, PROMPT_FIELDS, "prompt")["PromptID"])
    if pid in seen:
      raise SkipRecord("duplicate_prompt")
    seen.add(pid)
    anns = by_prompt.get(pid)
    if not anns:
      raise SkipRecord("no_annotation")
    label = majority([lab for lab, _ in anns])
    if label is None:
      raise SkipRecord("label_tie")
    pmcid = clean_text(row["PMCID"])
    return [{
        "prompt_id": pid, "pmcid": pmcid, "intervention": clean_text(row["Intervention"]),
        "comparator": clean_text(row["Comparator"]), "outcome": clean_text(row["Outcome"]),
        "label": label, "evidence": next((ev for lab, ev in anns if lab == label and ev), ""),
        "split": splits.get(pmcid, ""),
    }]

  return read_files(root / "prompts_merged.csv", ".csv", SOURCE, report,
                    load=_csv_loader(PROMPT_FIELDS, "prompt", ""), records=_rows, parse=prompt)


def question(row: dict) -> Example:
  """An Evidence Inference prompt as a plain 3-option question (label = reported direction)."""
  i, c, o = row["intervention"], row["comparator"], row["outcome"]
  options = (f"{i} significantly increased {o} compared with {c}.",
             f"{i} significantly decreased {o} compared with {c}.",
             f"No significant difference between {i} and {c} in {o}.")
  return Example(
      id=f"{SOURCE}:{row['prompt_id']}", source=SOURCE, kind="question",
      trial_id=f"PMC{row['pmcid']}", options=options, label=LABELS.index(row["label"]),
      title=f"Randomised trial report PMC{row['pmcid']}", endpoint=o, arms=(i, c),
      question_type="ico_direction", outcome_title=o)
