"""Evidence Inference reader: majority labels recomputed independently from the CSVs."""
import collections
import csv

from data_pipeline.build_report import BuildReport
from data_pipeline.readers.evidence_inference import (LABELS, majority, question,
                                                      read_evidence_inference)


def test_majority():
  assert majority(["a", "b", "a"]) == "a"
  assert majority(["a", "b"]) is None
  assert majority([]) is None


def test_real_files(full_data):
  root = full_data / "evidence_inference"
  r = BuildReport()
  ex = read_evidence_inference(root, r)
  assert len(ex) == r.n_read("evidence_inference") > 2000
  assert {e["label"] for e in ex} == set(LABELS)
  assert {e["split"] for e in ex} <= {"train", "validation", "test"}
  # Independent recount for one prompt read by hand: 11164 (LMWH vs unfractionated heparin).
  rows = [row for row in csv.DictReader(open(root / "v2_annotations.csv", encoding="utf-8"))
          if row["PromptID"] == "11164" and row["Valid Label"] != "False"]
  want = collections.Counter(row["Label"] for row in rows).most_common(1)[0][0]
  e = next(e for e in ex if e["prompt_id"] == "11164")
  assert e["label"] == want == "no significant difference"
  assert (e["pmcid"], e["intervention"], e["comparator"]) == (
      "59610", "LMWH", "Unfractionated heparin")
  assert e["evidence"].startswith("Recurrent venous thromboembolism")
  assert r.n_skipped("evidence_inference", "label_tie") > 0


def test_evidence_inference_question():
  q = question({"prompt_id": "7", "pmcid": "123", "intervention": "drug A",
                "comparator": "placebo", "outcome": "pain", "label": "significantly decreased"})
  assert q.options[q.label] == "drug A significantly decreased pain compared with placebo."
  assert q.trial_id == "PMC123" and len(q.options) == 3


def test_files_in_the_release_layout(data_root):
  """The reader on files written in Evidence Inference 2.0's layout (tests/data_files.py)."""
  import data_files
  r = BuildReport()
  ex = read_evidence_inference(data_root / "evidence_inference", r)
  want = {pid: (pmc, iv, comp, out, label)
          for pid, pmc, iv, comp, out, label in data_files.EVIDENCE_ROWS}
  assert {e["prompt_id"]: (e["pmcid"], e["intervention"], e["comparator"], e["outcome"],
                           e["label"]) for e in ex} == want
  assert {e["prompt_id"]: e["split"] for e in ex} == {
      "1": "train", "2": "train", "3": "train", "4": "train", "5": "train", "6": "validation"}


def test_an_unreadable_split_file_is_counted(data_root, tmp_path):
  import shutil
  root = tmp_path / "ei"
  shutil.copytree(data_root / "evidence_inference", root)
  (root / "ev2_train_article_ids.txt").write_bytes(b"PMC100\n\xff\xfe\xfa\n")
  r = BuildReport()
  ex = read_evidence_inference(root, r)
  assert r.n_skipped("evidence_inference", "bad_split_file") == 1
  assert len(ex) == 6 and {e["prompt_id"]: e["split"] for e in ex}["6"] == "validation"
