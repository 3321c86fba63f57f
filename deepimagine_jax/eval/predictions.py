"""CT Open predictions: `(nct_id, endpoint_str, question_index) -> text` with a DECISION line.

Two on-disk forms of the same mapping:
  * a pickle of a plain dict (protocol 4, built-in types only), the form the
    benchmark's own `evaluation.py` reads; read back with `safe_pickle`, never the
    stock unpickler;
  * JSON lines `{"nct_id", "endpoint_str", "question_index", "text"}`, one per
    question, for humans and tools.
Files are written to a temporary name and moved into place with `os.replace`, so
a crash never leaves a half-written file under the final name.

`python -m deepimagine_jax.eval.predictions RUN0.pkl [RUN1.jsonl ...]` scores
prediction files (ours, or any model's in the benchmark's format) on CT Open
Summer 2025, the runs averaged, and prints the table.
"""
from __future__ import annotations

import json
import os
import pathlib
import pickle
from typing import Mapping, Sequence

import numpy as np

from data_pipeline import io, safe_pickle
from data_pipeline.build_report import BuildReport
from data_pipeline.example import Example
from deepimagine_jax import rewards
from deepimagine_jax.eval import metrics

Key = tuple  # (nct_id: str, endpoint_str: str, question_index: int)
SOURCE = "predictions"
PICKLE_SUFFIXES = (".pkl", ".pickle")
JSONL_SUFFIXES = (".jsonl", ".json")


def has_key(q: Example) -> bool:
  """Whether the example is a benchmark question (it has CT Open's key)."""
  return bool(q.nct_id) and q.question_index >= 0


def question_key(q: Example) -> Key:
  """The benchmark key of a question."""
  if not has_key(q):
    raise ValueError(f"example {q.id}: no benchmark key (nct_id, endpoint_str, question_index)")
  return (q.nct_id, q.endpoint_str, q.question_index)


def format_decision(probs: Sequence[float]) -> str:
  """A `DECISION: (p1, p2[, p3])` line that parses back to the same probabilities."""
  return "DECISION: (" + ", ".join(repr(float(p)) for p in probs) + ")"


def predictions_from_probs(questions: Sequence[Example],
                           probs: Sequence[Sequence[float]]) -> dict:
  """Predictions for a model that outputs probabilities directly (the baselines)."""
  if len(questions) != len(probs):
    raise ValueError(f"{len(probs)} probability vectors for {len(questions)} questions")
  return {question_key(q): format_decision(p) for q, p in zip(questions, probs)}


def _check(preds: Mapping, source: str) -> dict:
  if not isinstance(preds, Mapping):
    raise TypeError(f"{source}: predictions must be a dict, got {type(preds).__name__}")
  out = {}
  for k, v in preds.items():
    if not (isinstance(k, tuple) and len(k) == 3 and isinstance(k[0], str)
            and isinstance(k[1], str) and isinstance(k[2], int)
            and not isinstance(k[2], bool)):
      raise ValueError(f"{source}: key {k!r} is not (nct_id: str, endpoint_str: str, "
                       "question_index: int)")
    if not isinstance(v, str):
      raise ValueError(f"{source}: value for key {k!r} is {type(v).__name__}, not str")
    out[k] = v
  return out


def write_pickle(path: str | os.PathLike, preds: Mapping) -> pathlib.Path:
  """Writes a plain-dict pickle (protocol 4) the benchmark script can read."""
  path = pathlib.Path(path)
  io.atomic_write(path, pickle.dumps(_check(preds, str(path)), protocol=4))
  return path


def write_jsonl(path: str | os.PathLike, preds: Mapping) -> pathlib.Path:
  """Writes one JSON object per prediction, sorted by key for stable diffs."""
  path = pathlib.Path(path)
  io.write_jsonl(path, [{"nct_id": k[0], "endpoint_str": k[1], "question_index": k[2], "text": v}
                        for k, v in sorted(_check(preds, str(path)).items())])
  return path


def write_runs(out_dir: str | os.PathLike, name: str, preds_runs: Sequence[Mapping]) -> list:
  """Run r as out_dir/predictions_<name>_run<r>.pkl and .jsonl; returns the pickle paths."""
  paths = []
  for r, preds in enumerate(preds_runs):
    stem = pathlib.Path(out_dir) / f"predictions_{name}_run{r}"
    paths.append(write_pickle(stem.with_suffix(".pkl"), preds))
    write_jsonl(stem.with_suffix(".jsonl"), preds)
  return paths


def read_predictions(path: str | os.PathLike, report: BuildReport | None = None) -> dict:
  """Reads either form back, chosen by suffix.

  A pickle must be a well-formed dict (else a clear error). In JSON lines a
  malformed line or a repeated key is counted in `report` under source
  "predictions" and skipped (the first occurrence of a key wins).
  """
  path = pathlib.Path(path)
  if path.suffix in PICKLE_SUFFIXES:
    preds = _check(safe_pickle.load(path), str(path))
    if report is not None:
      report.add_read(SOURCE, len(preds))
    return preds
  if path.suffix not in JSONL_SUFFIXES:
    raise ValueError(f"{path}: unknown predictions format (use {PICKLE_SUFFIXES} or "
                     f"{JSONL_SUFFIXES})")
  report = report if report is not None else BuildReport()
  preds = {}
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{n}"
      try:
        rec = json.loads(line)
        key = (rec["nct_id"], rec["endpoint_str"], rec["question_index"])
        text = rec["text"]
      except (json.JSONDecodeError, KeyError, TypeError):
        report.add_skip(SOURCE, "malformed_line", where)
        continue
      try:
        _check({key: text}, where)
      except ValueError:
        report.add_skip(SOURCE, "bad_field_type", where)
        continue
      if key in preds:
        report.add_skip(SOURCE, "duplicate_key", where)
        continue
      preds[key] = text
      report.add_read(SOURCE)
  return preds


def answers_from_predictions(questions: Sequence[Example], preds: Mapping) -> tuple[list, dict]:
  """(answers, failures): each question's parsed probabilities, or None, counted by reason.

  A question absent from `preds` is "missing"; a text rewards.parse_decision
  refuses is "unparsed:<error code>". Neither is ever given probabilities.
  """
  answers, failures = [], {}
  for q in questions:
    key = question_key(q)
    if key not in preds:
      answers.append(None)
      failures["missing"] = failures.get("missing", 0) + 1
      continue
    d = rewards.parse_decision(preds[key], q.n_options)
    if not d.ok:
      answers.append(None)
      code = f"unparsed:{d.error_code}"
      failures[code] = failures.get(code, 0) + 1
      continue
    answers.append(np.asarray(d.probs, dtype=np.float64))
  return answers, failures


def score_predictions(questions: Sequence[Example], runs: Sequence[Mapping], *,
                      strict: bool = False) -> dict:
  """Scores prediction dicts (one per run) against the questions, runs averaged.

  The benchmark table (strict False) scores the answered questions; the strict
  one scores every question (metrics.py). metrics["overall"]["failures"] sums
  every run's failure counts.
  """
  if isinstance(runs, Mapping):
    raise TypeError("runs must be a list of prediction dicts, one per run")
  answers_runs, failures = [], {}
  for preds in runs:
    extra = set(preds) - {question_key(q) for q in questions}
    if extra:
      raise ValueError(f"{len(extra)} predictions for questions not asked, e.g. "
                       f"{sorted(extra)[0]!r}")
    answers, counts = answers_from_predictions(questions, preds)
    answers_runs.append(answers)
    for k, v in counts.items():
      failures[k] = failures.get(k, 0) + v
  out = metrics.score_runs(questions, answers_runs, strict=strict)
  out["overall"]["failures"] = dict(sorted(failures.items()))
  return out


def main(argv: Sequence[str] | None = None):
  import argparse
  import sys

  from data_pipeline import data_root
  from data_pipeline.readers.ct_open import read_questions
  from deepimagine_jax.eval import report

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("runs", nargs="+", help="prediction files (.pkl / .jsonl), one per run")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  counts = BuildReport()
  summer = data_root.resolve_data_root(None) / "ct_open" / "Summer_2025.pickle"
  questions = read_questions(summer, counts, split="eval")
  runs = [read_predictions(p, counts) for p in args.runs]
  scores = score_predictions(questions, runs)
  print(f"{len(args.runs)} run(s) on CT Open Summer 2025 ({len(questions)} questions); "
        f"failures {scores['overall']['failures']}\n")
  print(report.format_table({"predictions": scores}))
  print("Strict (every question; a failure or a tie is a wrong answer):\n")
  print(report.format_table({"predictions": score_predictions(questions, runs, strict=True)}))


if __name__ == "__main__":
  main()
