"""CT Open metrics against hand-computed cases and a plain NumPy reference."""
import math

import numpy as np
import pytest

from data_pipeline.example import Example
from deepimagine_jax.eval import metrics as M

OPTS2 = ["The endpoint is met.", "This endpoint is not met."]
OPTS3_NODIFF_MIDDLE = [
    "Study Arm A is statistically significantly worse than Study Arm B.",
    "No statistically significant difference between Study Arm B and Study Arm A.",
    "Study Arm B is statistically significantly worse than Study Arm A.",
]


def _ref_balanced_acc(t, p):
  classes = sorted(set(t))
  return sum(sum(1 for a, b in zip(t, p) if a == c and b == c) / t.count(c)
             for c in classes) / len(classes)


def _ref_macro_f1(t, p):
  f1s = []
  for c in sorted(set(t) | set(p)):
    tp = sum(1 for a, b in zip(t, p) if a == c and b == c)
    fp = sum(1 for a, b in zip(t, p) if a != c and b == c)
    fn = sum(1 for a, b in zip(t, p) if a == c and b != c)
    f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
  return sum(f1s) / len(f1s)


def test_choose_ties_go_to_lowest_index():
  assert M.choose([0.5, 0.5]) == 0
  assert M.choose([0.2, 0.4, 0.4]) == 1
  assert M.choose([0.1, 0.2, 0.7]) == 2


def test_two_way_hand_computed():
  probs = [[0.9, 0.1], [0.4, 0.6], [0.5, 0.5], [0.2, 0.8]]
  labels = [0, 0, 0, 1]  # predictions 0, 1, 0 (tie), 1
  m = M.category_metrics(probs, labels, [-1] * 4)
  assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
  # class 0: P=1, R=2/3 -> F1=.8 ; class 1: P=.5, R=1 -> F1=2/3
  assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
  assert m["cross_entropy"] == pytest.approx(
      -(math.log(0.9) + math.log(0.4) + math.log(0.5) + math.log(0.8)) / 4)
  assert m["n"] == 4


def test_category_with_one_true_class():
  # Truth holds class 1 only; one question predicted 0.
  probs = [[0.3, 0.7], [0.6, 0.4], [0.0, 1.0]]
  m = M.category_metrics(probs, [1, 1, 1])
  assert m["balanced_accuracy"] == pytest.approx(2 / 3)  # recall of class 1 alone
  # union of classes {0, 1}: F1(1) = .8, F1(0) = 0 (predicted, never true)
  assert m["macro_f1"] == pytest.approx(0.4)
  assert m["cross_entropy"] == pytest.approx(-(math.log(0.7) + math.log(0.4) + 0.0) / 3)
  perfect = M.category_metrics([[0.1, 0.9]] * 2, [1, 1])
  assert perfect["balanced_accuracy"] == 1.0 and perfect["macro_f1"] == 1.0


def test_zero_probability_on_truth_is_finite():
  m = M.category_metrics([[1.0, 0.0]], [1])
  assert m["cross_entropy"] == pytest.approx(-math.log(M.EPS))
  assert math.isfinite(m["cross_entropy"])
  assert M.cross_entropy([0.0, 1.0]) == pytest.approx(-math.log(1e-12) / 2)


def test_no_difference_index_from_text():
  assert M.no_difference_index(OPTS3_NODIFF_MIDDLE) == 1
  with pytest.raises(ValueError):
    M.no_difference_index(OPTS3_NODIFF_MIDDLE[:1] + OPTS3_NODIFF_MIDDLE[2:] * 2)
  with pytest.raises(ValueError):
    M.no_difference_index([OPTS3_NODIFF_MIDDLE[1]] * 3)


def test_three_way_collapse_hand_computed():
  # no-difference option is index 1. truth -> collapsed (1 = different):
  #  q1 t=0 (1) p=2 (1) | q2 t=1 (0) p=0 (1) | q3 t=1 (0) p=1 (0) | q4 t=2 (1) p=tie->0 (1)
  probs = [[0.1, 0.2, 0.7], [0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.4, 0.2, 0.4]]
  labels = [0, 1, 1, 2]
  m = M.category_metrics(probs, labels, [1] * 4)
  assert m["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
  assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
  # cross-entropy on the full 3-way distribution
  assert m["cross_entropy"] == pytest.approx(
      -(math.log(0.1) + math.log(0.3) + math.log(0.6) + math.log(0.4)) / 4)
  # uncollapsed would differ (q1 would be wrong)
  raw = M.category_metrics(probs, labels)
  assert raw["balanced_accuracy"] != pytest.approx(m["balanced_accuracy"])


@pytest.mark.parametrize("seed", range(5))
def test_against_plain_reference(seed):
  rng = np.random.default_rng(seed)
  t = rng.integers(0, 3, 40).tolist()
  p = rng.integers(0, 3, 40).tolist()
  assert M.class_balanced_accuracy(t, p) == pytest.approx(_ref_balanced_acc(t, p))
  assert M.macro_f1(t, p) == pytest.approx(_ref_macro_f1(t, p))


def _q(options, label, category="", meta_label=""):
  return Example(id=f"q{label}", source="ct_open", kind="question", trial_id="NCT0",
                 options=tuple(options), label=label, category=category, meta_label=meta_label)


def test_score_questions_overall_is_mean_of_categories():
  qs = [_q(OPTS2, 0, "2-way/implicit"), _q(OPTS2, 1, "2-way/implicit"),
        _q(OPTS3_NODIFF_MIDDLE, 1, "3-way/explicit"), _q(OPTS3_NODIFF_MIDDLE, 0, "3-way/explicit")]
  probs = [[0.8, 0.2], [0.7, 0.3], [0.2, 0.5, 0.3], [0.2, 0.5, 0.3]]
  m = M.score_questions(qs, probs)
  assert set(m) == {"2-way/implicit", "3-way/explicit", "overall"}
  assert m["2-way/implicit"]["balanced_accuracy"] == pytest.approx(0.5)
  assert m["3-way/explicit"]["balanced_accuracy"] == pytest.approx(0.5)  # both predict no-diff
  for k in M.METRICS:
    assert m["overall"][k] == pytest.approx(
        (m["2-way/implicit"][k] + m["3-way/explicit"][k]) / 2)
  assert m["overall"]["n"] == 4
  with pytest.raises(ValueError, match="3 probabilities"):
    M.score_questions(qs[:1], [[0.2, 0.3, 0.5]])


def test_category_from_meta_label_and_runs_average():
  q = _q(OPTS2, 0, meta_label="no_arm")
  assert M.question_arrays([q])[1] == ["2-way/implicit"]
  assert M.category_of(3, "single_arm") == "3-way/explicit"
  with pytest.raises(ValueError):
    M.category_of(2, "weird")
  qs = [q, q.replace(label=1)]
  run_a = [[0.9, 0.1], [0.9, 0.1]]  # acc .5
  run_b = [[0.9, 0.1], [0.1, 0.9]]  # acc 1
  avg = M.score_runs(qs, [run_a, run_b])
  assert avg["overall"]["balanced_accuracy"] == pytest.approx(0.75)
  assert avg["overall"]["balanced_accuracy_std"] == pytest.approx(0.25)
  assert avg["overall"]["runs"] == 2
  ce_a = -(math.log(0.9) + math.log(0.1)) / 2
  ce_b = -math.log(0.9)
  assert avg["2-way/implicit"]["cross_entropy"] == pytest.approx((ce_a + ce_b) / 2)
