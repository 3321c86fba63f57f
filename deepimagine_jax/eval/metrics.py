"""CT Open scoring: the benchmark's own rules, plus coverage and a stricter table.

The rules are those of the benchmark's `evaluations/evaluation.py`
(github.com/ClinicalTrial-OpenChallenge/CT_Open), restated here and tested
against a plain NumPy reference:
  * probabilities: the scores normalised, clipped at 1e-12 and renormalised
    (`benchmark_probs`); the choice is the argmax, ties to the lowest index;
  * categories `{2,3}-way` x `implicit` (meta_label no_arm /
    no_distinguishable_arm) or `explicit` (single_arm / distinguishable_arm),
    written "2-way/explicit" here for the benchmark's "2-way_explicit";
  * 3-way questions: accuracy and F1 on the options mapped BY INDEX, {0, 1} -> 1
    ("different"), {2} -> 0 ("no difference"); cross-entropy on the 3
    probabilities;
  * class-balanced accuracy = mean recall over the classes in the truth;
    macro-F1 = scikit-learn's `f1_score(average="macro", zero_division=0)`;
    cross-entropy = mean -log max(p(true), 1e-12);
  * per run, then each category averaged over the runs that hold it, overall =
    the plain mean of the averaged categories;
  * a question without an answer is not scored.

Where the project departs from the script, it says so in every result:
  * coverage = answered / asked, per category and overall, beside every score
    (the script silently scores whatever the file holds);
  * an answer that is missing or did not parse is counted by reason; the script
    stops on an unparseable one, the benchmark table leaves it out, and the
    strict table (`strict=True`) scores every asked question: a failure counts
    as a wrong option with p(true) = 0 (cost -log 1e-12), and a tie for the top
    probability, which the script hands to option 0, counts as a wrong choice
    (its cross-entropy is its own).
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

from data_pipeline.example import Example

# The benchmark's floor on probabilities (clipping and cross-entropy).
EPS = 1e-12

IMPLICIT = frozenset({"no_arm", "no_distinguishable_arm"})
EXPLICIT = frozenset({"single_arm", "distinguishable_arm"})
CATEGORIES = ("2-way/explicit", "2-way/implicit", "3-way/explicit", "3-way/implicit")
METRICS = ("balanced_accuracy", "macro_f1", "cross_entropy")
NO_DIFF_INDEX = 2  # the benchmark maps 3-way options by index: 2 is "no difference"

_NO_DIFF_RE = re.compile(r"\bno\s+(statistically\s+)?significant\s+difference\b", re.I)

Answer = np.ndarray | None  # the probabilities of one answer; None: no usable answer


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
  """Index of the "no statistically significant difference" option of a 3-way question."""
  hits = [i for i, o in enumerate(options) if _NO_DIFF_RE.search(o)]
  if len(hits) != 1:
    raise ValueError(f"expected exactly one 'no significant difference' option, "
                     f"found {len(hits)} in {list(options)!r}")
  return hits[0]


def benchmark_probs(scores: Sequence[float]) -> np.ndarray:
  """Normalise, clip at EPS, renormalise: the probabilities the benchmark scores."""
  raw = np.asarray(scores, dtype=np.float64)
  if raw.ndim != 1 or raw.size == 0 or not np.all(np.isfinite(raw)) or np.any(raw < 0) \
      or raw.sum() <= 0:
    raise ValueError(f"scores must be finite, non-negative and not all zero, got {raw!r}")
  p = np.clip(raw / raw.sum(), EPS, 1.0)
  return p / p.sum()


def choose(probs: Sequence[float]) -> int:
  """The chosen option: argmax, ties broken towards the lowest index (the benchmark's)."""
  return int(np.argmax(np.asarray(probs, dtype=np.float64)))


def is_tie(probs: Sequence[float]) -> bool:
  """Whether two or more options share the top probability (no answer, in the strict table)."""
  p = np.asarray(probs, dtype=np.float64)
  return int(np.count_nonzero(p == p.max())) > 1


def collapsed(labels: Sequence[int], n_options: Sequence[int]) -> np.ndarray:
  """Classes accuracy and F1 are taken on: 3-way {0, 1} -> 1, {2} -> 0; 2-way unchanged."""
  y, n = np.asarray(labels, np.int64), np.asarray(n_options, np.int64)
  return np.where(n == 3, (y != NO_DIFF_INDEX).astype(np.int64), y)


def wrong_option(label: int, n_options: int) -> int:
  """An option whose collapsed class is not the truth's: how the strict table scores a failure."""
  if n_options == 3:
    return 0 if label == NO_DIFF_INDEX else NO_DIFF_INDEX
  return 1 - label


def class_balanced_accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
  """Mean recall over the classes present in the truth."""
  y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
  if y_true.size == 0:
    raise ValueError("class_balanced_accuracy of an empty set")
  return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
  """Mean F1 over the classes in truth OR predictions (scikit-learn's macro, zero_division=0)."""
  y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
  if y_true.size == 0:
    raise ValueError("macro_f1 of an empty set")
  # F1 of class c = 2 tp / (2 tp + fp + fn); each class here is in truth or predictions, so
  # the denominator is never 0. In NumPy: scikit-learn's call costs ~5 ms of input checks, and
  # a bootstrap interval scores thousands of resamples (tests/test_eval_metrics.py compares).
  classes = np.union1d(y_true, y_pred)
  true_CN, pred_CN = y_true[None] == classes[:, None], y_pred[None] == classes[:, None]
  tp_C = np.sum(true_CN & pred_CN, axis=1)
  return float(np.mean(2 * tp_C / (true_CN.sum(axis=1) + pred_CN.sum(axis=1))))


def cross_entropy(p_true: Sequence[float], eps: float = EPS) -> float:
  """Mean -log p(true option), p floored at eps."""
  p = np.asarray(p_true, dtype=np.float64)
  if p.size == 0:
    raise ValueError("cross_entropy of an empty set")
  return float(np.mean(-np.log(np.maximum(p, eps))))


def question_arrays(questions: Sequence[Example]) -> tuple[np.ndarray, list, np.ndarray]:
  """(labels, categories, n_options) of the questions, each checked.

  A 3-way question whose "no difference" option is not at index 2 is refused:
  the benchmark's index mapping would score it wrongly.
  """
  labels, categories, n_options = [], [], []
  for q in questions:
    if q.n_options not in (2, 3):
      raise ValueError(f"question {q.id}: field 'options' has {q.n_options} entries, need 2 or 3")
    if not 0 <= q.label < q.n_options:
      raise ValueError(f"question {q.id}: label {q.label} out of range for {q.n_options} options")
    if q.n_options == 3 and no_difference_index(q.options) != NO_DIFF_INDEX:
      raise ValueError(f"question {q.id}: the 'no significant difference' option must be "
                       f"option {NO_DIFF_INDEX} (the benchmark maps 3-way options by index)")
    labels.append(q.label)
    categories.append(q.category or category_of(q.n_options, q.meta_label))
    n_options.append(q.n_options)
  return np.asarray(labels, np.int64), categories, np.asarray(n_options, np.int64)


def _answer_probs(questions: Sequence[Example], answers: Sequence[Answer]) -> list:
  if len(answers) != len(questions):
    raise ValueError(f"{len(answers)} answers for {len(questions)} questions")
  out = []
  for q, a in zip(questions, answers):
    if a is None:
      out.append(None)
      continue
    if len(a) != q.n_options:
      raise ValueError(f"question {q.id}: {len(a)} probabilities for {q.n_options} options")
    out.append(benchmark_probs(a))
  return out


def score_run(questions: Sequence[Example], answers: Sequence[Answer], *,
              strict: bool = False) -> dict:
  """One run: {category: metrics, "overall": metrics}; answers[i] answers questions[i].

  Each category holds the three METRICS, `n` (questions scored), `asked`,
  `answered` and `coverage`; a category with nothing to score has NaN metrics
  and is left out of the overall mean (the benchmark skips it).
  """
  labels, categories, n_opts = question_arrays(questions)
  probs = _answer_probs(questions, answers)
  answered = np.array([p is not None for p in probs])
  ties = np.array([p is not None and is_tie(p) for p in probs])
  preds = np.array([choose(p) if p is not None and not (strict and t)
                    else wrong_option(y, n) for p, t, y, n in zip(probs, ties, labels, n_opts)],
                   dtype=np.int64)
  p_true = np.array([0.0 if p is None else p[y] for p, y in zip(probs, labels)])
  out = {}
  cats = np.asarray(categories)
  for cat in sorted(set(categories), key=category_order):
    asked = cats == cat
    rows = asked if strict else asked & answered
    entry = {"asked": int(asked.sum()), "answered": int((asked & answered).sum()),
             "n": int(rows.sum())}
    entry["coverage"] = entry["answered"] / entry["asked"]
    entry.update({m: float("nan") for m in METRICS})
    if rows.any():
      y_true = collapsed(labels[rows], n_opts[rows])
      y_pred = collapsed(preds[rows], n_opts[rows])
      entry.update(balanced_accuracy=class_balanced_accuracy(y_true, y_pred),
                   macro_f1=macro_f1(y_true, y_pred), cross_entropy=cross_entropy(p_true[rows]))
    out[cat] = entry
  overall = _mean_of_categories(out)
  overall.update(asked=len(questions), answered=int(answered.sum()),
                 n=int(len(questions) if strict else answered.sum()),
                 coverage=float(answered.mean()) if len(questions) else float("nan"),
                 ties=int(ties.sum()))
  out["overall"] = overall
  return out


def average_runs(run_metrics: Sequence[Mapping[str, Mapping]]) -> dict:
  """Runs averaged as the benchmark does: each category over the runs that hold it,
  then overall = the plain mean of the averaged categories.

  Counts (n, answered, coverage, ties) are averaged too; asked is the same in
  every run. With several runs each metric also gets its standard deviation.
  """
  if not run_metrics:
    raise ValueError("no runs to average")
  cats = sorted({k for r in run_metrics for k in r if k != "overall"}, key=category_order)
  for r in run_metrics:
    if set(r) - {"overall"} != set(cats):
      raise ValueError(f"runs ask different categories: {sorted(r)} vs {cats}")
  out = {cat: _mean_entry([r[cat] for r in run_metrics]) for cat in cats}
  overall = _mean_entry([r["overall"] for r in run_metrics])
  overall.update(_mean_of_categories(out))
  overall["runs"] = len(run_metrics)
  out["overall"] = overall
  return out


def _mean_of_categories(cats: Mapping[str, Mapping]) -> dict:
  """Each metric's plain mean over the categories that scored something (NaN if none)."""
  scored = [c for c in cats.values() if np.isfinite(c["balanced_accuracy"])]
  return {m: float(np.mean([c[m] for c in scored])) if scored else float("nan")
          for m in METRICS}


def _mean_entry(rows: Sequence[Mapping]) -> dict:
  """Metrics over the runs that scored something; counts over every run."""
  scored = [r for r in rows if np.isfinite(r["balanced_accuracy"])]
  entry = {m: float(np.mean([r[m] for r in scored])) if scored else float("nan")
           for m in METRICS}
  for k in ("n", "answered", "ties"):
    if k in rows[0]:
      values = [r[k] for r in rows]
      entry[k] = values[0] if len(set(values)) == 1 else float(np.mean(values))
  entry["asked"] = rows[0]["asked"]
  entry["coverage"] = float(np.mean([r["coverage"] for r in rows]))
  if len(rows) > 1:
    entry.update({f"{m}_std": float(np.std([r[m] for r in scored])) if scored else float("nan")
                  for m in METRICS})
  return entry


def score_runs(questions: Sequence[Example], runs: Sequence[Sequence[Answer]], *,
               strict: bool = False) -> dict:
  """Several runs of answers over the same questions, scored and averaged."""
  return average_runs([score_run(questions, r, strict=strict) for r in runs])


def category_order(key: str) -> tuple:
  """Sort key: the CATEGORIES order, then unknown names, "overall" last."""
  return (key == "overall", CATEGORIES.index(key) if key in CATEGORIES else 99, key)
