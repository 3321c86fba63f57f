"""CT Open scoring: class-balanced accuracy, macro-F1 and cross-entropy per category.

Follows the benchmark's own evaluation (CT_Open `evaluations/evaluation.py`) and
../shared/data/README.md:
  * categories: `{2,3}-way` x `implicit` (meta_label no_arm / no_distinguishable_arm)
    or `explicit` (single_arm / distinguishable_arm), written "2-way/explicit" etc.;
  * the choice is the argmax of the probabilities; ties go to the LOWEST option
    index (numpy's argmax), so equal scores everywhere pick option 0;
  * 3-way questions are scored for accuracy and F1 after collapsing the two
    "significantly different" options into one class (1) versus the "no
    significant difference" option (0); cross-entropy always uses the full
    distribution over the original options;
  * the overall figure is the plain mean over the categories present, and a list
    of runs is scored run by run and then averaged.

With these definitions the published Winter->Summer figures for uniform scores
(.500 / .287) and the per-category majority class (.500 / .429) are reproduced
exactly (see tests/test_eval_baselines.py).
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

import numpy as np
from sklearn.metrics import f1_score

from data_pipeline.example import Example

# Probabilities are clipped to [EPS, 1] before the log so a zero probability on the
# truth costs -log(1e-12) ~= 27.6 nats instead of infinity; the benchmark's own
# script uses the same constant.
EPS = 1e-12

IMPLICIT = frozenset({"no_arm", "no_distinguishable_arm"})
EXPLICIT = frozenset({"single_arm", "distinguishable_arm"})
CATEGORIES = ("2-way/explicit", "2-way/implicit", "3-way/explicit", "3-way/implicit")
METRICS = ("balanced_accuracy", "macro_f1", "cross_entropy")

_NO_DIFF_RE = re.compile(r"\bno\s+(statistically\s+)?significant\s+difference\b", re.I)


def category_of(n_options: int, meta_label: str) -> str:
  """The CT Open category of a question, e.g. "2-way/implicit"."""
  if meta_label in IMPLICIT:
    arms = "implicit"
  elif meta_label in EXPLICIT:
    arms = "explicit"
  else:
    raise ValueError(f"meta_label {meta_label!r} is neither implicit "
                     f"{sorted(IMPLICIT)} nor explicit {sorted(EXPLICIT)}")
  if n_options not in (2, 3):
    raise ValueError(f"a CT Open question has 2 or 3 options, got {n_options}")
  return f"{n_options}-way/{arms}"


def no_difference_index(options: Sequence[str]) -> int:
  """Index of the "no statistically significant difference" option of a 3-way question.

  Found from the text (not assumed to be the last option) so a reordered question
  still collapses correctly.
  """
  hits = [i for i, o in enumerate(options) if _NO_DIFF_RE.search(o)]
  if len(hits) != 1:
    raise ValueError(f"expected exactly one 'no significant difference' option, "
                     f"found {len(hits)} in {list(options)!r}")
  return hits[0]


def choose(probs: Sequence[float]) -> int:
  """The chosen option: argmax, ties broken towards the lowest index."""
  return int(np.argmax(np.asarray(probs, dtype=np.float64)))


def class_balanced_accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
  """Mean recall over the classes present in the truth.

  A class that only the predictions contain has no recall and is left out, so a
  category whose truth holds one class scores that class's recall alone.
  """
  y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
  if y_true.size == 0:
    raise ValueError("class_balanced_accuracy of an empty set")
  recalls = [np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]
  return float(np.mean(recalls))


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
  """Unweighted mean F1 over the classes present in the truth OR the predictions.

  This is scikit-learn's `f1_score(average="macro")` with its default labels (the
  union) and zero_division=0, as in the benchmark's script. A class that is
  predicted but absent from the truth counts with F1 = 0 (it is a real error);
  the union is also the definition that reproduces the published uniform (.287)
  and majority (.429) figures.
  """
  y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
  if y_true.size == 0:
    raise ValueError("macro_f1 of an empty set")
  return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def cross_entropy(p_true: Sequence[float], eps: float = EPS) -> float:
  """Mean -log p(true option), p clipped to [eps, 1]."""
  p = np.asarray(p_true, dtype=np.float64)
  if p.size == 0:
    raise ValueError("cross_entropy of an empty set")
  return float(np.mean(-np.log(np.clip(p, eps, 1.0))))


def category_metrics(probs: Sequence[Sequence[float]], labels: Sequence[int],
                     no_diff: Sequence[int] | None = None) -> dict:
  """Metrics for the questions of one category.

  probs: one probability vector per question (2 or 3 entries); labels: index of
  the true option; no_diff: per question, the index of the "no significant
  difference" option for 3-way questions (-1 for 2-way). When given (>= 0),
  accuracy and F1 use the collapsed classes 1 = "different", 0 = "no difference".
  """
  n = len(labels)
  if len(probs) != n:
    raise ValueError(f"{len(probs)} probability vectors for {n} labels")
  y_true = np.asarray(labels, dtype=np.int64)
  y_pred = np.array([choose(p) for p in probs], dtype=np.int64)
  p_true = np.array([np.asarray(p, dtype=np.float64)[t] for p, t in zip(probs, y_true)])
  if no_diff is not None:
    no_diff_idx = np.asarray(no_diff, dtype=np.int64)
    collapse = no_diff_idx >= 0
    y_true = np.where(collapse, (y_true != no_diff_idx).astype(np.int64), y_true)
    y_pred = np.where(collapse, (y_pred != no_diff_idx).astype(np.int64), y_pred)
  return {
      "balanced_accuracy": class_balanced_accuracy(y_true, y_pred),
      "macro_f1": macro_f1(y_true, y_pred),
      "cross_entropy": cross_entropy(p_true),
      "n": n,
  }


def score(probs: Sequence[Sequence[float]], labels: Sequence[int],
          categories: Sequence[str], no_diff: Sequence[int]) -> dict:
  """Per-category metrics plus "overall" (plain mean over categories present)."""
  if not (len(probs) == len(labels) == len(categories) == len(no_diff)):
    raise ValueError("probs, labels, categories and no_diff differ in length")
  out = {}
  category_array = np.asarray(categories)
  for cat in sorted(set(categories)):
    idx = np.flatnonzero(category_array == cat)
    out[cat] = category_metrics([probs[i] for i in idx], [labels[i] for i in idx],
                                [no_diff[i] for i in idx])
  if not out:
    raise ValueError("nothing to score")
  out["overall"] = {m: float(np.mean([out[c][m] for c in out])) for m in METRICS}
  out["overall"]["n"] = len(labels)
  return out


def average_runs(run_metrics: Sequence[Mapping[str, Mapping]]) -> dict:
  """Mean of per-run metric dicts, key by key, over the runs that hold a category.

  The overall row is averaged like the others (mean over runs of each run's
  category mean), as the benchmark does.
  """
  if not run_metrics:
    raise ValueError("no runs to average")
  keys = sorted({k for r in run_metrics for k in r}, key=category_order)
  out = {}
  for k in keys:
    rows = [r[k] for r in run_metrics if k in r]
    out[k] = {m: float(np.mean([row[m] for row in rows])) for m in METRICS}
    out[k]["n"] = rows[0]["n"]
    if len(run_metrics) > 1:
      out[k].update({f"{m}_std": float(np.std([row[m] for row in rows])) for m in METRICS})
  out["overall"]["runs"] = len(run_metrics)
  return out


def question_arrays(questions: Iterable[Example]) -> tuple[list, list, list]:
  """(labels, categories, no_diff) of the questions (a missing category: from meta_label)."""
  labels, categories, no_diffs = [], [], []
  for q in questions:
    if not 0 <= q.label < q.n_options:
      raise ValueError(f"question {q.id}: label {q.label} out of range "
                       f"for {q.n_options} options")
    labels.append(q.label)
    categories.append(q.category or category_of(q.n_options, q.meta_label))
    no_diffs.append(no_difference_index(q.options) if q.n_options == 3 else -1)
  return labels, categories, no_diffs


def score_questions(questions: Sequence[Example], probs: Sequence[Sequence[float]]) -> dict:
  """Scores one run: `probs[i]` are the probabilities for `questions[i]`."""
  labels, categories, no_diffs = question_arrays(questions)
  for q, p in zip(questions, probs):
    if len(p) != q.n_options:
      raise ValueError(f"question {q.id}: {len(p)} probabilities for {q.n_options} options")
  return score(probs, labels, categories, no_diffs)


def score_runs(questions: Sequence[Example], runs: Sequence[Sequence[Sequence[float]]]) -> dict:
  """Scores several runs of probabilities over the same questions and averages them."""
  return average_runs([score_questions(questions, r) for r in runs])


def category_order(key: str) -> tuple:
  """Sort key: the CATEGORIES order, then unknown names, "overall" last."""
  return (key == "overall", CATEGORIES.index(key) if key in CATEGORIES else 99, key)
