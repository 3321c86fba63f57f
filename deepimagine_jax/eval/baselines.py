"""Correlational baselines for CT Open: uniform, majority, TF-IDF logistic regression / random forest.

Formulation (published Winter -> Summer figures: LR .577 / .563, RF .549 / .531
class-balanced accuracy / macro-F1; the recipe behind them is not public):
  * every question is reduced to one binary "outcome class": 1 = the positive
    option is true (the endpoint is met / the arm achieved a significant
    improvement / a significant difference in a 3-way question), 0 = not;
  * one model over all categories, features = TF-IDF (sublinear tf, otherwise
    scikit-learn defaults) of title + endpoint + the arm lines + a category
    token; class_weight="balanced" (without it both learners collapse towards
    the majority class on this small, skewed training set);
  * P(positive) goes to the positive option of a 2-way question; in a 3-way
    question 1 - P goes to "no significant difference" and P is split evenly
    between the two directional options (text features cannot tell the direction);
  * hyper-parameters (LR_GRID, RF_GRID) are chosen by CV_FOLDS-fold
    cross-validation on the TRAINING questions only, folds grouped by trial,
    on the benchmark's overall class-balanced accuracy (`cross_validate`); the
    evaluation questions never choose anything. The TF-IDF vocabulary is fitted
    on the whole training split (no labels involved);
  * the random forest is run with several seeds, averaged as runs, as the
    benchmark averages runs.

`pair_baselines` adds anchor features for counterfactual pairs: the anchor's
observed outcome class and the perturbation factors, plus their products, so a
linear model can learn "the anchor's answer flips under this perturbation";
`copy_anchor_probs` is the reference any pair method must beat: the anchor's
outcome class, with the agreement rate seen on the training pairs.

Run `python -m deepimagine_jax.eval.baselines` to print the Winter -> Summer table.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.ensemble import RandomForestClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold

from data_pipeline import facts
from data_pipeline.example import Anchor, Example
from deepimagine_jax.eval import metrics, report

RF_TREES = 100
RF_SEEDS = (0, 1, 2)
LR_MAX_ITER = 2000
CV_FOLDS = 5
# Candidates, most regularised first (the first of equal CV scores wins); half-decade
# steps for C, wide enough that the choice on the real training split is inside.
LR_GRID = tuple({"C": c} for c in (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0))
RF_GRID = tuple({"min_samples_leaf": leaf, "max_features": feats}
                for leaf in (20, 10, 5, 1) for feats in ("log2", "sqrt"))
GRIDS = {"logreg": LR_GRID, "random_forest": RF_GRID}
LEARNERS = (("logreg", "logreg_tfidf"), ("random_forest", "random_forest_tfidf"))

# The negative option of a 2-way question: "... has not achieved ...",
# "No arm listed here met this endpoint.", "This endpoint is not met."
_NEGATIVE_RE = re.compile(r"\bhas not achieved\b|^\s*no arm\b|\bis not met\b", re.I)


def positive_index(options: Sequence[str]) -> int:
  """Index of the option that asserts a positive result, found from the text.

  For a 3-way question the "positive" side is the pair of directional options;
  the returned index is -1 there (see `outcome_class`).
  """
  if len(options) == 3:
    return -1
  neg = [i for i, o in enumerate(options) if _NEGATIVE_RE.search(o)]
  if len(options) != 2 or len(neg) != 1:
    raise ValueError(f"cannot tell the positive option of {list(options)!r}")
  return 1 - neg[0]


def outcome_class(q: Example | Anchor) -> int:
  """1 if the question's true option is the positive / significant one, else 0."""
  if len(q.options) == 3:
    return int(q.label != metrics.no_difference_index(q.options))
  return int(q.label == positive_index(q.options))


def probs_from_positive(options: Sequence[str], p_pos: float) -> np.ndarray:
  """Spreads P(positive) over the options of a question."""
  if len(options) == 3:
    out = np.full(3, p_pos / 2.0)
    out[metrics.no_difference_index(options)] = 1.0 - p_pos
    return out
  out = np.empty(2)
  pos = positive_index(options)
  out[pos], out[1 - pos] = p_pos, 1.0 - p_pos
  return out


def question_text(q: Example) -> str:
  """Title + endpoint + arms + category token; the prompt when those are empty."""
  parts = [q.title, q.endpoint, "\n".join(q.arms)]
  if not any(p.strip() for p in parts):
    parts = [q.prompt]
  parts.append("cat_" + re.sub(r"\W", "_", _category(q)))
  return " ".join(parts)


def _category(q: Example) -> str:
  return q.category or f"{q.n_options}-way"


def uniform_probs(questions: Sequence[Example]) -> list:
  return [np.full(q.n_options, 1.0 / q.n_options) for q in questions]


def majority_probs(train: Sequence[Example], questions: Sequence[Example]) -> list:
  """The training outcome-class frequency per category, add-one smoothed.

  The argmax is the training majority of the category (ties: positive); the
  smoothed frequencies (not a one-hot) keep its cross-entropy finite and honest.
  A category absent from training falls back to all training questions.
  """
  counts: dict = {}
  for q in train:
    c = counts.setdefault(_category(q), np.zeros(2))
    c[outcome_class(q)] += 1
  total = sum(counts.values(), np.zeros(2))
  out = []
  for q in questions:
    c = counts.get(_category(q), total) + 1.0
    out.append(probs_from_positive(q.options, c[1] / c.sum()))
  return out


def _vectorizer() -> TfidfVectorizer:
  return TfidfVectorizer(sublinear_tf=True)


def _learner(name: str, params: dict, seed: int):
  if name == "logreg":
    return LogisticRegression(max_iter=LR_MAX_ITER, class_weight="balanced", **params)
  if name == "random_forest":
    return RandomForestClassifier(n_estimators=RF_TREES, random_state=seed,
                                  class_weight="balanced", n_jobs=1, **params)
  raise ValueError(f"unknown learner {name!r}")


def _p_positive(clf, X) -> np.ndarray:
  """P(class 1), also when training held one class only."""
  proba = clf.predict_proba(X)
  classes = list(clf.classes_)
  if 1 not in classes:
    return np.zeros(X.shape[0])
  return proba[:, classes.index(1)]


def _fit_predict(name: str, params: dict, seed: int, X_train, y_train, X_eval) -> np.ndarray:
  if len(set(y_train)) < 2:  # nothing to learn: predict the single class seen
    return np.full(X_eval.shape[0], float(y_train[0]))
  return _p_positive(_learner(name, params, seed).fit(X_train, y_train), X_eval)


def _seeds(name: str, seeds: Sequence[int]) -> Sequence[int]:
  return seeds if name == "random_forest" else (0,)  # LR is deterministic


def _answers(examples: Sequence[Example], p_positive: Sequence[float]) -> list:
  return [probs_from_positive(q.options, p) for q, p in zip(examples, p_positive)]


def cross_validate(name: str, X, y: np.ndarray, examples: Sequence[Example], *,
                   seed: int = 0, folds: int = CV_FOLDS) -> tuple[dict, list]:
  """(best params, [(params, mean CV score)]) over GRIDS[name] on training data only.

  Folds are grouped by trial (a trial's questions never straddle a split); the
  score is the benchmark's overall class-balanced accuracy on the held-out fold.
  """
  groups = np.array([ex.trial_id for ex in examples])
  n_folds = min(folds, len(set(groups)))
  if n_folds < 2:
    raise ValueError(f"cross-validation needs training questions from 2 or more trials, "
                     f"got {len(set(groups))}")
  splits = list(GroupKFold(n_splits=n_folds).split(X, y, groups))
  table = []
  for params in GRIDS[name]:
    scores = []
    for train_idx, held_idx in splits:
      p = _fit_predict(name, params, seed, X[train_idx], y[train_idx], X[held_idx])
      held = [examples[i] for i in held_idx]
      scores.append(metrics.score_run(held, _answers(held, p))["overall"]["balanced_accuracy"])
    table.append((dict(params), float(np.mean(scores))))
  best = max(range(len(table)), key=lambda i: (table[i][1], -i))
  return table[best][0], table


def learned_runs(name: str, X_train, y: np.ndarray, train: Sequence[Example], X_eval,
                 questions: Sequence[Example], seeds: Sequence[int],
                 folds: int = CV_FOLDS) -> tuple[list, dict]:
  """(runs of probabilities over `questions`, the CV choice) for one learner."""
  seeds = _seeds(name, seeds)
  params, table = cross_validate(name, X_train, y, train, seed=seeds[0], folds=folds)
  runs = [_answers(questions, _fit_predict(name, params, s, X_train, y, X_eval)) for s in seeds]
  return runs, {"params": params, "cv": table}


def baseline_probs(train_questions: Sequence[Example], eval_questions: Sequence[Example],
                   rf_seeds: Sequence[int] = RF_SEEDS,
                   folds: int = CV_FOLDS) -> tuple[dict, dict]:
  """({name: runs, each a list of probability vectors over eval_questions}, {name: CV choice})."""
  out = {"uniform": [uniform_probs(eval_questions)],
         "majority": [majority_probs(train_questions, eval_questions)]}
  vec = _vectorizer()
  X_train = vec.fit_transform([question_text(q) for q in train_questions])
  X_eval = vec.transform([question_text(q) for q in eval_questions])
  y = np.array([outcome_class(q) for q in train_questions])
  chosen = {}
  for name, key in LEARNERS:
    out[key], chosen[key] = learned_runs(name, X_train, y, train_questions, X_eval,
                                         eval_questions, rf_seeds, folds)
  return out, chosen


def run_baselines(train_questions: Sequence[Example], eval_questions: Sequence[Example],
                  rf_seeds: Sequence[int] = RF_SEEDS, *, strict: bool = False) -> dict:
  """name -> CT Open metrics dict (per category + "overall"), runs averaged."""
  runs, _ = baseline_probs(train_questions, eval_questions, rf_seeds)
  return {name: metrics.score_runs(eval_questions, r, strict=strict) for name, r in runs.items()}


def anchor_features(pairs: Sequence[Example]) -> np.ndarray:
  """[anchor positive, anchor negative, factor one-hots, anchor-class x factor]."""
  rows = []
  for ex in pairs:
    a = outcome_class(ex.anchor)
    factors = set(filter(None, ex.perturbation.split("+")))
    unknown = factors - set(facts.FACTORS)
    if unknown:
      raise ValueError(f"pair {ex.id}: unknown perturbation factors {sorted(unknown)}")
    f = np.array([float(x in factors) for x in facts.FACTORS])
    rows.append(np.concatenate([[a, 1 - a], f, a * f, (1 - a) * f]))
  return np.asarray(rows, dtype=np.float64).reshape(len(pairs), 2 + 3 * len(facts.FACTORS))


def pair_problem(ex: Example) -> str | None:
  """Why the pair learners cannot use this pair (None: usable)."""
  try:
    outcome_class(ex)
  except ValueError:
    return "target_outcome_class"
  try:
    outcome_class(ex.anchor)
  except ValueError:
    return "anchor_outcome_class"
  try:
    anchor_features([ex])
  except ValueError:
    return "unknown_perturbation"
  return None


def copy_anchor_probs(train_pairs: Sequence[Example], eval_pairs: Sequence[Example]) -> list:
  """The anchor's outcome class as the answer: the reference a pair method must beat.

  Its confidence is the rate at which a training pair's target has its anchor's
  outcome class (add-one smoothed), so its cross-entropy is honest too.
  """
  agree = sum(outcome_class(ex) == outcome_class(ex.anchor) for ex in train_pairs)
  rate = (agree + 1.0) / (len(train_pairs) + 2.0)
  return [probs_from_positive(ex.options, rate if outcome_class(ex.anchor) else 1.0 - rate)
          for ex in eval_pairs]


def pair_baselines(train_pairs: Sequence[Example], eval_pairs: Sequence[Example],
                   rf_seeds: Sequence[int] = RF_SEEDS,
                   folds: int = CV_FOLDS) -> tuple[dict, dict]:
  """({name: runs of probabilities over eval_pairs}, {name: CV choice}).

  LR / RF on the target question's TF-IDF, without and with anchor features,
  and copy-the-anchor. Each pair is an Example with its `anchor` (incl. the
  anchor's `label`) and `perturbation`; pair_problem tells which pairs these
  learners can use.
  """
  vec = _vectorizer()
  text_train = vec.fit_transform([question_text(q) for q in train_pairs])
  text_eval = vec.transform([question_text(q) for q in eval_pairs])
  anchor_train = sp.csr_matrix(anchor_features(train_pairs))
  anchor_eval = sp.csr_matrix(anchor_features(eval_pairs))
  y = np.array([outcome_class(q) for q in train_pairs])
  out, chosen = {"copy_anchor": [copy_anchor_probs(train_pairs, eval_pairs)]}, {}
  for name, key in LEARNERS:
    for suffix, X_train, X_eval in (
        ("", text_train, text_eval),
        ("+anchor", sp.hstack([text_train, anchor_train]).tocsr(),
         sp.hstack([text_eval, anchor_eval]).tocsr())):
      out[key + suffix], chosen[key + suffix] = learned_runs(
          name, X_train, y, train_pairs, X_eval, eval_pairs, rf_seeds, folds)
  return out, chosen


def main():
  from data_pipeline import data_root
  from data_pipeline.build_report import BuildReport
  from data_pipeline.readers.ct_open import read_questions
  root = data_root.resolve_data_root(None)
  counts = BuildReport()
  train = read_questions(root / "ct_open" / "Winter_2025.pickle", counts, split="train")
  evals = read_questions(root / "ct_open" / "Summer_2025.pickle", counts, split="eval")
  print(f"CT Open baselines, trained on Winter 2025 ({len(train)} questions), "
        f"scored on Summer 2025 ({len(evals)} questions)\n")
  runs, chosen = baseline_probs(train, evals)
  for name, c in chosen.items():
    print(f"{name}: chosen by {CV_FOLDS}-fold CV on Winter: {c['params']} "
          f"(CV class-balanced accuracy {max(s for _, s in c['cv']):.3f})")
  for strict in (False, True):
    print("\nStrict: every question, a tie or a failure is a wrong answer\n" if strict else "")
    print(report.format_table({name: metrics.score_runs(evals, r, strict=strict)
                               for name, r in runs.items()}))


if __name__ == "__main__":
  main()
