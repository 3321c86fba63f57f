"""Baselines: the published Winter -> Summer figures, option logic, and pair features."""
import numpy as np
import pytest

from data_pipeline import facts
from data_pipeline.build_report import BuildReport
from data_pipeline.example import Anchor, Example
from data_pipeline.readers.ct_open import read_questions
from deepimagine_jax.eval import baselines as B
from deepimagine_jax.eval import metrics as M
from deepimagine_jax.eval import report

# Published overall (class-balanced accuracy, macro-F1), trained on Winter 2025,
# scored on Summer 2025.
PUBLISHED = {"uniform": (0.500, 0.287), "majority": (0.500, 0.429),
             "logreg_tfidf": (0.577, 0.563), "random_forest_tfidf": (0.549, 0.531)}
# Stated before comparing, not tuned: uniform and majority follow from the rules
# alone (exact up to the published three decimals). The learned baselines' recipe is not published and ours picks its
# hyper-parameters by cross-validation on Winter, so the comparison can only be as
# fine as the test set allows: two standard errors of the overall figures from a
# bootstrap over the Summer questions (resampled within category, 200 draws:
# 0.039 / 0.042 for LR / RF accuracy, 0.019 / 0.045 for macro-F1), rounded up.
TOL = {"uniform": 5e-4, "majority": 5e-4, "logreg_tfidf": 0.08, "random_forest_tfidf": 0.08}

POS = "The study arm X has achieved statistically significant improvements over the study arm Y."
NEG = ("The study arm X has not achieved statistically significant improvements over the "
       "study arm Y, either because of no statistical effect or worse effect.")
OPTS3 = ["Study Arm X is statistically significantly worse than Study Arm Y.",
         "Study Arm Y is statistically significantly worse than Study Arm X.",
         "No statistically significant difference between Study Arm Y and Study Arm X."]


def _q(options, label, category=""):
  return Example(id="q", source="ct_open", kind="question", trial_id="NCT0",
                 options=tuple(options), label=label, category=category)


@pytest.fixture(scope="module")
def ct_open(full_data):
  """The real Winter -> Summer questions: the published figures are checked on them."""
  report = BuildReport()
  train = read_questions(full_data / "ct_open" / "Winter_2025.pickle", report, split="train")
  evals = read_questions(full_data / "ct_open" / "Summer_2025.pickle", report, split="eval")
  assert (len(train), len(evals)) == (605, 857)
  return train, evals


@pytest.fixture(scope="module")
def results(ct_open):
  return B.run_baselines(*ct_open)


@pytest.mark.slow  # the real Winter -> Summer fit with 5-fold CV: about 20 s of CPU
def test_reproduces_published_figures(results):
  for name, (acc, f1) in PUBLISHED.items():
    got = results[name]["overall"]
    assert got["balanced_accuracy"] == pytest.approx(acc, abs=TOL[name]), name
    assert got["macro_f1"] == pytest.approx(f1, abs=TOL[name]), name


@pytest.mark.slow  # shares the fit above
def test_learned_beat_uniform_and_are_finite(results):
  for name in ("logreg_tfidf", "random_forest_tfidf"):
    assert results[name]["overall"]["macro_f1"] > results["uniform"]["overall"]["macro_f1"] + 0.1
    assert results[name]["overall"]["cross_entropy"] < results["uniform"]["overall"]["cross_entropy"]
  assert results["uniform"]["2-way/explicit"]["cross_entropy"] == pytest.approx(np.log(2))
  assert results["uniform"]["3-way/explicit"]["cross_entropy"] == pytest.approx(np.log(3))
  table = report.format_table(results)
  assert table.count("\n| ") == 5 and "3-way/explicit (n=49)" in table
  assert "[857/857]" in table


def test_every_real_question_has_an_outcome_class(ct_open):
  for q in ct_open[0] + ct_open[1]:
    p = B.probs_from_positive(q.options, 0.9)
    assert p.sum() == pytest.approx(1.0)
    # the positive class gets the top probability: its collapsed class is "positive"
    assert B.outcome_class(q.replace(label=M.choose(p))) == 1


def test_positive_option_from_text():
  assert B.positive_index([POS, NEG]) == 0
  assert B.positive_index([NEG, POS]) == 1
  assert B.positive_index(["At least one arm listed here met this endpoint.",
                           "No arm listed here met this endpoint."]) == 0
  with pytest.raises(ValueError):
    B.positive_index([POS, POS])
  assert B.outcome_class(_q(OPTS3, 2)) == 0
  assert B.outcome_class(_q(OPTS3, 1)) == 1
  np.testing.assert_allclose(B.probs_from_positive(OPTS3, 0.6), [0.3, 0.3, 0.4])
  np.testing.assert_allclose(B.probs_from_positive([NEG, POS], 0.8), [0.2, 0.8])


def test_majority_hand_computed():
  cat = "2-way/explicit"
  train = [_q([POS, NEG], 1, cat)] * 3 + [_q([POS, NEG], 0, cat)]
  got = B.majority_probs(train, [_q([POS, NEG], 0, cat), _q(OPTS3, 0, "3-way/explicit")])
  np.testing.assert_allclose(got[0], [2 / 6, 4 / 6])  # (1+1)/(4+2) positive
  np.testing.assert_allclose(got[1], [1 / 6, 1 / 6, 4 / 6])  # unseen category: all training


def _pairs(n, seed):
  """Pairs whose label is the anchor's outcome (dose) or its opposite (population).

  The target text is random words, so only the anchor features carry signal.
  """
  rng = np.random.default_rng(seed)
  vocab = [f"w{i}" for i in range(50)]
  out = []
  for i in range(n):
    a = int(rng.integers(2))
    pert = "dose" if rng.random() < 0.5 else "population"
    y = a if pert == "dose" else 1 - a
    anchor = Anchor(id=f"a{seed}-{i}", trial_id="NCT1", title="", endpoint="", arms=(),
                    options=(POS, NEG), label=0 if a else 1, question_type="")
    out.append(_q([POS, NEG], 0 if y else 1, "2-way/explicit").replace(
        id=f"p{seed}-{i}", trial_id=f"T{seed}-{i}", kind="natural_pair", perturbation=pert,
        title=" ".join(rng.choice(vocab, 8)), endpoint="m.", anchor=anchor))
  return out


def test_pair_baselines_use_the_anchor():
  train, evals = _pairs(300, 0), _pairs(120, 1)
  runs, chosen = B.pair_baselines(train, evals, rf_seeds=(0,), folds=2)
  res = {k: M.score_runs(evals, r) for k, r in runs.items()}
  assert set(res) == {"copy_anchor", "logreg_tfidf", "logreg_tfidf+anchor",
                      "random_forest_tfidf", "random_forest_tfidf+anchor"}
  assert set(chosen) == set(res) - {"copy_anchor"}
  for name in ("logreg_tfidf", "random_forest_tfidf"):
    plain = res[name]["overall"]["balanced_accuracy"]
    anchored = res[name + "+anchor"]["overall"]["balanced_accuracy"]
    assert anchored > 0.9, name
    assert anchored > plain + 0.2, name


def test_copy_anchor_hand_computed():
  train, evals = _pairs(40, 0), _pairs(10, 1)
  agree = sum(B.outcome_class(ex) == B.outcome_class(ex.anchor) for ex in train)
  rate = (agree + 1) / (40 + 2)
  for ex, p in zip(evals, B.copy_anchor_probs(train, evals)):
    want = rate if B.outcome_class(ex.anchor) else 1 - rate
    assert p[B.positive_index(ex.options)] == pytest.approx(want)


def test_cross_validation_chooses_on_training_folds_only():
  """Labels that a tiny C cannot fit: CV must move away from the most regularised
  candidate; with no signal at all, the first (most regularised) candidate wins ties."""
  rng = np.random.default_rng(0)
  qs, X = [], []
  for i in range(120):
    x = rng.standard_normal(4)
    y = int(x[0] + 0.05 * rng.standard_normal() > 0)
    qs.append(_q([POS, NEG], 0 if y else 1, "2-way/explicit").replace(id=f"c{i}",
                                                                      trial_id=f"T{i // 2}"))
    X.append(x)
  X, y = np.asarray(X), np.array([B.outcome_class(q) for q in qs])
  best, table = B.cross_validate("logreg", X, y, qs)
  assert [p for p, _ in table] == list(B.LR_GRID)
  assert best == max(table, key=lambda t: t[1])[0] and best != B.LR_GRID[0]
  flat, _ = B.cross_validate("logreg", np.zeros((120, 4)), y, qs)
  assert flat == B.LR_GRID[0]
  with pytest.raises(ValueError, match="2 or more trials"):
    B.cross_validate("logreg", X[:4], y[:4], [q.replace(trial_id="T") for q in qs[:4]])


def test_anchor_features_reject_unknown_factor():
  bad = _pairs(1, 0)[0].replace(perturbation="weather")
  with pytest.raises(ValueError, match="weather"):
    B.anchor_features([bad])
  f = B.anchor_features([bad.replace(perturbation="dose+phase")])
  assert f.shape == (1, 2 + 3 * len(facts.FACTORS))
  assert f[0, 2 + facts.FACTORS.index("dose")] == 1 and f[0, 2 + facts.FACTORS.index("phase")] == 1
