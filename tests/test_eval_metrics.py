"""CT Open metrics: hand-computed cases and a plain NumPy reference written from the
benchmark's published rules (not from its code, and not from metrics.py)."""
import math

import numpy as np
import pytest
from sklearn.metrics import f1_score

from data_pipeline.example import Example
from deepimagine_jax.eval import metrics as M

OPTS2 = ("The endpoint is met.", "This endpoint is not met.")
OPTS3 = ("Study Arm A is statistically significantly worse than Study Arm B.",
         "Study Arm B is statistically significantly worse than Study Arm A.",
         "No statistically significant difference between Study Arm B and Study Arm A.")
META = {"2-way/explicit": "single_arm", "2-way/implicit": "no_arm",
        "3-way/explicit": "distinguishable_arm"}


def _q(i, n, label, category):
  return Example(id=f"q{i}", source="ct_open", kind="question", trial_id=f"NCT{i}",
                 options=OPTS2 if n == 2 else OPTS3, label=label, category=category,
                 meta_label=META[category])


# The reference: the published rules, one loop each ------------------------------------

def _ref_probs(scores):
  p = np.array(scores, float) / np.sum(scores)
  p = np.array([min(max(x, 1e-12), 1.0) for x in p])
  return p / p.sum()


def _ref_recall_mean(t, p):
  classes = sorted(set(t))
  return sum(sum(a == c and b == c for a, b in zip(t, p)) / t.count(c) for c in classes) / len(classes)


def _ref_macro_f1(t, p):
  f1s = []
  for c in sorted(set(t) | set(p)):
    tp = sum(a == c and b == c for a, b in zip(t, p))
    fp = sum(a != c and b == c for a, b in zip(t, p))
    fn = sum(a == c and b != c for a, b in zip(t, p))
    f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
  return sum(f1s) / len(f1s)


def _ref_run(questions, answers):
  """{category: (acc, f1, ce)} over the answered questions of one run."""
  per_cat = {}
  for q, a in zip(questions, answers):
    if a is None:
      continue  # not in the predictions: not scored
    p = _ref_probs(a)
    pred = max(range(len(p)), key=lambda i: (p[i], -i))  # argmax, lowest index on ties
    t, y = q.label, pred
    if q.n_options == 3:  # by index: {0, 1} -> 1, {2} -> 0
      t, y = int(t in (0, 1)), int(y in (0, 1))
    per_cat.setdefault(q.category, []).append((t, y, -math.log(max(p[q.label], 1e-12))))
  return {c: (_ref_recall_mean([r[0] for r in rows], [r[1] for r in rows]),
              _ref_macro_f1([r[0] for r in rows], [r[1] for r in rows]),
              sum(r[2] for r in rows) / len(rows)) for c, rows in per_cat.items()}


def _ref_score(questions, runs):
  """Runs averaged per category (over the runs holding it); overall = mean of categories."""
  per_run = [_ref_run(questions, r) for r in runs]
  cats = sorted({c for r in per_run for c in r})
  out = {c: tuple(np.mean([r[c][k] for r in per_run if c in r]) for k in range(3)) for c in cats}
  out["overall"] = tuple(np.mean([out[c][k] for c in cats]) for k in range(3))
  return out


def _random_case(seed, n_questions=60, runs=3, missing=0.1):
  rng = np.random.default_rng(seed)
  cats = list(META)
  qs = []
  for i in range(n_questions):
    cat = cats[rng.integers(3)]
    n = 3 if cat.startswith("3") else 2
    qs.append(_q(i, n, int(rng.integers(n)), cat))
  all_runs = []
  for _ in range(runs):
    answers = []
    for q in qs:
      if rng.random() < missing:
        answers.append(None)
      elif rng.random() < 0.15:  # exact ties and exact zeros happen in real outputs
        a = rng.integers(0, 3, q.n_options).astype(float)
        a[rng.integers(q.n_options)] += 1.0  # never all zero
        answers.append(a)
      else:
        answers.append(rng.random(q.n_options) * 10 ** rng.uniform(-14, 2, q.n_options))
    all_runs.append(answers)
  return qs, all_runs


# Against the reference ----------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_matches_plain_reference(seed):
  qs, runs = _random_case(seed)
  got = M.score_runs(qs, runs)
  want = _ref_score(qs, runs)
  assert set(got) == set(want)
  for cat, values in want.items():
    for k, m in enumerate(M.METRICS):
      assert got[cat][m] == pytest.approx(values[k], abs=1e-12), (cat, m)


def test_class_metrics_against_reference():
  rng = np.random.default_rng(7)
  for _ in range(5):
    t, p = rng.integers(0, 3, 40).tolist(), rng.integers(0, 3, 40).tolist()
    assert M.class_balanced_accuracy(t, p) == pytest.approx(_ref_recall_mean(t, p))
    assert M.macro_f1(t, p) == pytest.approx(_ref_macro_f1(t, p))
    assert M.macro_f1(t, p) == pytest.approx(f1_score(t, p, average="macro", zero_division=0))
  # a class only predicted, a class never predicted, one class in all
  for t, p in [([0, 0, 1], [0, 2, 1]), ([0, 1, 1], [0, 0, 0]), ([1, 1], [1, 1])]:
    assert M.macro_f1(t, p) == pytest.approx(f1_score(t, p, average="macro", zero_division=0))


# Hand-computed ------------------------------------------------------------------------

def test_probabilities_normalised_clipped_renormalised():
  np.testing.assert_allclose(M.benchmark_probs([3, 1]), [0.75, 0.25])
  p = M.benchmark_probs([1.0, 0.0])
  assert p[1] == pytest.approx(1e-12 / (1 + 1e-12)) and p.sum() == pytest.approx(1.0)
  for bad in ([0, 0], [-1, 2], [1, float("nan")], []):
    with pytest.raises(ValueError, match="scores"):
      M.benchmark_probs(bad)


def test_two_way_hand_computed():
  qs = [_q(i, 2, t, "2-way/explicit") for i, t in enumerate([0, 0, 0, 1])]
  m = M.score_run(qs, [[0.9, 0.1], [0.4, 0.6], [0.5, 0.5], [0.2, 0.8]])  # preds 0, 1, 0 (tie), 1
  c = m["2-way/explicit"]
  assert c["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
  assert c["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)  # class 0: P 1 R 2/3; class 1: P .5 R 1
  assert c["cross_entropy"] == pytest.approx(
      -(math.log(0.9) + math.log(0.4) + math.log(0.5) + math.log(0.8)) / 4)
  assert (c["n"], c["asked"], c["answered"], c["coverage"]) == (4, 4, 4, 1.0)
  assert m["overall"]["ties"] == 1


def test_three_way_maps_by_index():
  # truth -> class: 0 -> 1, 1 -> 1, 1 -> 1, 2 -> 0 ; preds: 1 -> 1, 0 -> 1, 2 -> 0, 0 (tie) -> 1
  qs = [_q(i, 3, t, "3-way/explicit") for i, t in enumerate([0, 1, 1, 2])]
  probs = [[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [0.4, 0.2, 0.4]]
  c = M.score_run(qs, probs)["3-way/explicit"]
  assert c["balanced_accuracy"] == pytest.approx((2 / 3 + 0) / 2)
  # class 1: tp 2, fp 1, fn 1 -> F1 2/3; class 0: tp 0 -> 0
  assert c["macro_f1"] == pytest.approx(1 / 3)
  assert c["cross_entropy"] == pytest.approx(
      -(math.log(0.1) + math.log(0.3) + math.log(0.2) + math.log(0.4)) / 4)


def test_three_way_no_difference_must_be_last():
  bad = _q(0, 3, 0, "3-way/explicit").replace(options=(OPTS3[0], OPTS3[2], OPTS3[1]))
  with pytest.raises(ValueError, match="q0.*option 2"):
    M.score_run([bad], [[0.2, 0.3, 0.5]])


def test_zero_on_truth_costs_the_floor():
  m = M.score_run([_q(0, 2, 1, "2-way/implicit")], [[1.0, 0.0]])
  assert m["overall"]["cross_entropy"] == pytest.approx(-math.log(1e-12), rel=1e-9)


def test_unanswered_not_scored_and_coverage():
  qs = [_q(i, 2, t, "2-way/implicit") for i, t in enumerate([0, 1, 1])]
  qs.append(_q(3, 3, 2, "3-way/explicit"))
  m = M.score_run(qs, [[0.8, 0.2], None, [0.3, 0.7], None])
  c = m["2-way/implicit"]
  assert (c["n"], c["asked"], c["answered"]) == (2, 3, 2)
  assert c["coverage"] == pytest.approx(2 / 3)
  assert c["balanced_accuracy"] == 1.0  # both answered are right
  assert m["3-way/explicit"]["coverage"] == 0.0
  assert math.isnan(m["3-way/explicit"]["balanced_accuracy"])
  # overall: the mean over the categories that scored something (here one)
  assert m["overall"]["balanced_accuracy"] == 1.0
  assert (m["overall"]["answered"], m["overall"]["asked"]) == (2, 4)
  assert m["overall"]["coverage"] == 0.5
  nothing = M.score_run(qs[:1], [None])
  assert math.isnan(nothing["overall"]["balanced_accuracy"]) and nothing["overall"]["coverage"] == 0


def test_strict_scores_failures_and_ties_as_wrong():
  qs = [_q(i, 2, t, "2-way/explicit") for i, t in enumerate([0, 1, 0, 1])]
  answers = [[0.9, 0.1], None, [0.5, 0.5], [0.3, 0.7]]
  m = M.score_run(qs, answers, strict=True)["2-way/explicit"]
  # preds: 0 (right), wrong -> 0, tie -> wrong -> 1, 1 (right)
  assert m["n"] == 4 and m["answered"] == 3
  assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1 / 2) / 2)
  assert m["cross_entropy"] == pytest.approx(
      -(math.log(0.9) + math.log(1e-12) + math.log(0.5) + math.log(0.7)) / 4)
  # the benchmark table scores the tie as option 0 (right here) and leaves None out
  lenient = M.score_run(qs, answers)["2-way/explicit"]
  assert lenient["n"] == 3 and lenient["balanced_accuracy"] == 1.0
  # a 3-way failure is wrong in the collapsed classes whatever the truth
  assert M.wrong_option(2, 3) == 0 and M.wrong_option(0, 3) == 2 and M.wrong_option(1, 3) == 2
  assert M.wrong_option(0, 2) == 1 and M.wrong_option(1, 2) == 0


def test_runs_average_as_the_benchmark():
  qs = [_q(0, 2, 0, "2-way/implicit"), _q(1, 2, 1, "2-way/implicit"),
        _q(2, 3, 2, "3-way/explicit")]
  run_a = [[0.9, 0.1], [0.9, 0.1], [0.1, 0.1, 0.8]]  # 2-way acc .5, 3-way acc 1
  run_b = [[0.9, 0.1], [0.1, 0.9], None]  # 2-way acc 1, 3-way not answered
  avg = M.score_runs(qs, [run_a, run_b])
  assert avg["2-way/implicit"]["balanced_accuracy"] == pytest.approx(0.75)
  assert avg["2-way/implicit"]["balanced_accuracy_std"] == pytest.approx(0.25)
  assert avg["3-way/explicit"]["balanced_accuracy"] == 1.0  # over the run that holds it
  assert avg["3-way/explicit"]["coverage"] == 0.5  # coverage over every run
  assert avg["overall"]["balanced_accuracy"] == pytest.approx((0.75 + 1.0) / 2)
  assert avg["overall"]["runs"] == 2 and avg["overall"]["answered"] == 2.5
  ce_a = -(math.log(0.9) + math.log(0.1)) / 2
  assert avg["2-way/implicit"]["cross_entropy"] == pytest.approx((ce_a - math.log(0.9)) / 2)


def test_category_from_meta_label_and_bad_inputs():
  q = _q(0, 2, 0, "2-way/implicit").replace(category="")
  assert M.question_arrays([q])[1] == ["2-way/implicit"]
  assert M.category_of(3, "single_arm") == "3-way/explicit"
  with pytest.raises(ValueError, match="meta_label"):
    M.category_of(2, "weird")
  with pytest.raises(ValueError, match="q0: 3 probabilities"):
    M.score_run([q], [[0.2, 0.3, 0.5]])
  with pytest.raises(ValueError, match="q0: label 5"):
    M.score_run([q.replace(label=5)], [[0.5, 0.5]])
  with pytest.raises(ValueError, match="2 answers for 1"):
    M.score_run([q], [None, None])
