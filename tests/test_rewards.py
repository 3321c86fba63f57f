"""DECISION parsing against the benchmark's published rules; rewards against hand values."""
import ast
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from deepimagine_jax import rewards


def benchmark_reading(text: str):
  """The rules as the issue states them, written out step by step: (probs, choice).

  Raises where the benchmark's script would stop; may return NaN probabilities.
  """
  for token in ("*", "#", "```python", "```"):
    text = text.replace(token, "")
  after = text.split("DECISION:")[-1]
  first_line = after.strip().split("\n")[0].strip()
  scores = ast.literal_eval(first_line.split(")")[0] + ")")
  raw = np.array(scores, dtype=np.float64)
  with np.errstate(all="ignore"):
    probs = raw / raw.sum()
    probs = np.clip(probs, 1e-12, 1.0)
    probs = probs / probs.sum()
  return probs, int(np.argmax(probs))


GOOD = [
    # (text, n_options, choice, tie)
    ("DECISION: (0.7, 0.3)", 2, 0, False),
    ("DECISION: (0.2, 0.5, 0.3)", 3, 1, False),
    ("DECISION: (1e-3, 3e-3)", 2, 1, False),
    ("DECISION: (.5, 1.)", 2, 1, False),
    ("DECISION: (+1, 3)", 2, 1, False),
    ("DECISION: (-0, 1)", 2, 1, False),  # negative zero is zero
    ("DECISION:(0.7,0.3)", 2, 0, False),
    ("DECISION: ( 0.7 ,  0.3 )", 2, 0, False),
    ("DECISION: (1e300, 1e300)", 2, 0, True),
    # ints, and Python's other integer literals
    ("DECISION: (2, 6)", 2, 1, False),
    ("DECISION: (1,0)", 2, 0, False),  # 0 is clipped to 1e-12 and renormalised
    ("DECISION: (0, 0, 7)", 3, 2, False),
    ("DECISION: (1_0, 0x1)", 2, 0, False),
    # the tuple on a line after DECISION:
    ("DECISION:\n(0.1, 0.9)", 2, 1, False),
    ("DECISION:  \n\n   (0.1, 0.9)\nmore text", 2, 1, False),
    # trailing text after the tuple, up to its first ')'
    ("DECISION: (0.7, 0.3) because option 1 fits.", 2, 0, False),
    ("DECISION: (0.7, 0.3)..", 2, 0, False),
    ("DECISION: (0.7, 0.3))", 2, 0, False),
    ("DECISION: (0.7, 0.3", 2, 0, False),  # the benchmark closes it itself
    # a trailing comma
    ("DECISION: (1, 0,)", 2, 0, False),
    ("DECISION: (0.2, 0.3, 0.5, )", 3, 2, False),
    # ties: the choice is the lowest index (the benchmark's), flagged as a tie
    ("DECISION: (0.5, 0.5)", 2, 0, True),
    ("DECISION: (1, 2, 2)", 3, 1, True),
    ("The dose doubled.\nOption 2 fits.\nDECISION: (0.1, 0.9)", 2, 1, False),
    ("DECISION: (0.9, 0.1)\nOn reflection...\nDECISION: (0.2, 0.8)", 2, 1, False),  # the last
    ("**DECISION:** (0.6, 0.4)", 2, 0, False),  # markdown removed first
    ("## DECISION: (0.6, 0.4)", 2, 0, False),
    ("```python\nDECISION: (0.6, 0.4)\n```", 2, 0, False),
    ("My final DECISION: (0.3, 0.7)", 2, 1, False),
    ("DECISION: (0.7, 0.3)\r\n", 2, 0, False),
]

BAD = [
    # (text, n_options, error code)
    ("", 2, "no_decision_line"),
    ("I think option 1.", 2, "no_decision_line"),
    ("decision: (1,0)", 2, "no_decision_line"),  # case-sensitive
    ("(0.7, 0.3)", 2, "no_decision_line"),  # the benchmark would read the bare line
    ("DECISION: 0.7, 0.3", 2, "not_a_tuple"),
    ("DECISION: [0.7, 0.3]", 2, "not_a_tuple"),
    ("DECISION: ((0.7, 0.3))", 2, "not_a_tuple"),
    ("DECISION: (0.7 0.3)", 2, "not_a_tuple"),
    ("DECISION: (70%, 30%)", 2, "not_a_tuple"),
    ("DECISION: (high, low)", 2, "not_a_tuple"),  # names are not literals
    ("DECISION: (nan, 1)", 2, "not_a_tuple"),
    ("DECISION:", 2, "not_a_tuple"),
    ("DECISION: (0.9, 0.1)\nDECISION: maybe", 2, "not_a_tuple"),  # the last one decides
    # wrong count
    ("DECISION: (0.7, 0.3, 0.0)", 2, "wrong_count"),
    ("DECISION: (0.7)", 2, "wrong_count"),
    ("DECISION: (0.7, 0.3)", 3, "wrong_count"),
    ("DECISION: ()", 2, "wrong_count"),
    ("DECISION: (1,)", 2, "wrong_count"),
    # negatives (the benchmark would divide by a sum that may be 0 or negative)
    ("DECISION: (0.7, -0.3)", 2, "negative"),
    ("DECISION: (-1, -3)", 2, "negative"),
    ("DECISION: (-1e-3, 1)", 2, "negative"),
    ("DECISION: ('a', 1)", 2, "non_numeric"),
    ("DECISION: (True, False)", 2, "non_numeric"),
    ("DECISION: (None, 1)", 2, "non_numeric"),
    ("DECISION: (1j, 1)", 2, "non_numeric"),
    ("DECISION: ({}, 1)", 2, "non_numeric"),
    ("DECISION: (1e999, 1)", 2, "non_finite"),
    ("DECISION: (1e308, 1e308)", 2, "non_finite"),  # the sum overflows
    ("DECISION: (0, 0)", 2, "all_zero"),
    ("DECISION: (0.0, 0e5, -0)", 3, "all_zero"),
    (None, 2, "not_text"),
    (b"DECISION: (1, 0)", 2, "not_text"),
    ("DECISION: (1, 0)", 0, "bad_n_options"),
    ("DECISION: (1, 0)", True, "bad_n_options"),
]


@pytest.mark.parametrize("text,n,choice,tie", GOOD)
def test_parse_good_equals_benchmark(text, n, choice, tie):
  d = rewards.parse_decision(text, n)
  assert d.ok, d.error
  assert d.error == ""
  probs, bench_choice = benchmark_reading(text)
  assert d.probs.dtype == np.float64
  np.testing.assert_array_equal(d.probs, probs)  # bit for bit
  assert d.choice == bench_choice == choice
  assert d.tie == tie
  assert np.all(d.probs > 0.99e-12) and math.isclose(d.probs.sum(), 1.0)


def test_parse_hand_values():
  """A few cases by hand, independent of any re-implementation."""
  np.testing.assert_allclose(rewards.parse_decision("DECISION: (2, 6)", 2).probs, [0.25, 0.75],
                             rtol=1e-15)
  np.testing.assert_allclose(rewards.parse_decision("DECISION:\n(1, 0,) and so on", 2).probs,
                             [1 / (1 + 1e-12), 1e-12 / (1 + 1e-12)], rtol=1e-15)
  np.testing.assert_allclose(rewards.parse_decision("DECISION: (1, 1, 2) ok", 3).probs,
                             [0.25, 0.25, 0.5], rtol=1e-15)


@pytest.mark.parametrize("text,n,code", BAD)
def test_parse_bad(text, n, code):
  d = rewards.parse_decision(text, n)
  assert not d.ok
  assert d.probs is None and d.choice is None and not d.tie
  assert d.error_code == code, d.error
  assert code in rewards.ERROR_CODES


# Failures where the benchmark's script would still produce a number (named departures).
DEPARTURES = {"no_decision_line", "wrong_count", "non_numeric", "negative", "non_finite",
              "all_zero"}


def _agrees_with_benchmark(text: str, n: int):
  d = rewards.parse_decision(text, n)
  assert d.error_code != "internal", d.error
  try:
    probs, choice = benchmark_reading(text)
    readable = probs.shape == (n,) and bool(np.all(np.isfinite(probs)))
  except Exception:  # noqa: BLE001  the benchmark's script stops here
    readable = False
  if d.ok:
    assert readable
    np.testing.assert_array_equal(d.probs, probs)
    assert d.choice == choice
  elif readable:
    assert d.error_code in DEPARTURES, (text, d.error)


@settings(max_examples=300, deadline=None)
@given(st.text(), st.integers(min_value=-2, max_value=5))
def test_parse_never_raises_on_any_text(text, n):
  d = rewards.parse_decision(text, n)
  assert d.error_code != "internal", d.error
  if d.ok:
    assert np.all(d.probs > 0) and math.isclose(d.probs.sum(), 1.0, rel_tol=1e-9)


_score = st.one_of(
    st.floats(min_value=0, max_value=1e6, allow_nan=False).map(repr),
    st.integers(min_value=-3, max_value=100).map(str),
    st.sampled_from(["nan", "inf", "-1", "x", "", "1e999", "0", ".5", "1.", "True", "1_0",
                     "0x2", "'a'", "None", "(1, 2)", "1j"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(_score, min_size=0, max_size=4), st.sampled_from(["", ",", " ,"]),
       st.text(max_size=20), st.sampled_from([" ", "\n", "\n\n ", "**"]),
       st.text(max_size=8), st.integers(min_value=1, max_value=3))
def test_parse_agrees_with_benchmark_near_valid(scores, comma, before, gap, after, n):
  """Fuzz around the valid shape: accepted means the benchmark's numbers exactly."""
  _agrees_with_benchmark(f"{before}\nDECISION:{gap}({', '.join(scores)}{comma}){after}", n)


# ----------------------------------------------------------------------------- class balance

def test_class_balance_weights_by_hand(caplog):
  b = rewards.ClassBalance.of([0, 0, 0, 1, 2, 2], [2, 2, 2, 2, 3, 3])
  # 2 options: f(0) = 3/4 -> 1/(2*3/4) = 2/3, f(1) = 1/4 -> 2; 3 options: only label 2, f = 1.
  assert dict(b.weights) == pytest.approx({(2, 0): 2 / 3, (2, 1): 2.0, (3, 2): 1 / 3})
  assert "no label [0, 1]" in caplog.text  # counted aloud, not silent
  np.testing.assert_allclose(b.weight_of([1, 0, 2], [2, 2, 3]), [2.0, 2 / 3, 1 / 3])
  with pytest.raises(ValueError, match="label 0 of 3 options"):
    b.weight_of([0], [3])
  with pytest.raises(ValueError, match="outside"):
    rewards.ClassBalance.of([2], [2])
  with pytest.raises(ValueError, match="as many labels"):
    rewards.ClassBalance.of([0, 1], [2])


def _one_hot(n, i):
  return "DECISION: (" + ", ".join("1" if j == i else "0" for j in range(n)) + ")"


def _decision(p):
  return "DECISION: (" + ", ".join(repr(float(x)) for x in p) + ")"


def _expected(name, text, labels, n, balance):
  """Exact expected reward of answering `text` to every prompt (one grading per label)."""
  present, counts = np.unique(labels, return_counts=True)
  a = rewards.grade([text] * len(present), present.tolist(), [n] * len(present), balance)
  return float(np.sum(counts * rewards.get_reward(name)(a).astype(np.float64)) / len(labels))


@pytest.fixture(scope="module")
def winter_labels():
  """(n_options, labels) with the skew of CT Open Winter 2025's questions (2-way 365:185,
  3-way 6:2:47), which RL prompts come from."""
  return {2: [0] * 365 + [1] * 185, 3: [0] * 6 + [1] * 2 + [2] * 47}


@pytest.mark.parametrize("name", ["correctness", "log_prob", "brier"])
def test_no_constant_answer_beats_uniform_random(winter_labels, name):
  """On real, skewed labels (2-way 365:185, 3-way 6:2:47), in exact expectation."""
  rng = np.random.default_rng(0)
  for n, labels in winter_labels.items():
    balance = rewards.ClassBalance.of(labels, [n] * len(labels))
    prior = np.bincount(labels, minlength=n) / len(labels)
    constants = ([_one_hot(n, i) for i in range(n)] + [_decision(prior), _decision([1] * n)]
                 + [_decision(p) for p in rng.dirichlet(np.ones(n), 30)])
    # Uniform-random: a one-hot answer on a uniformly drawn option, or the uniform distribution.
    random_one_hot = np.mean([_expected(name, _one_hot(n, i), labels, n, balance)
                              for i in range(n)])
    chance = max(random_one_hot, _expected(name, _decision([1] * n), labels, n, balance))
    best = max(_expected(name, t, labels, n, balance) for t in constants)
    assert best <= chance + 1e-6, (n, best, chance)
    if name == "correctness":
      assert chance == pytest.approx(1 / n, rel=1e-6)
      # Without the class weights the majority answer is paid above chance: the test has teeth.
      flat = rewards.ClassBalance(tuple(((n, y), 1.0) for y in range(n)))
      majority = _one_hot(n, int(np.argmax(prior)))
      assert _expected(name, majority, labels, n, flat) > 1 / n + 0.1


# ----------------------------------------------------------------------------- rewards

COMPLETIONS = [
    "reasoning\nDECISION: (0.8, 0.2)",   # right, p=0.8
    "DECISION: (0.25, 0.75)",            # wrong (label 0)
    "DECISION: (0.2, 0.5, 0.3)",         # right (label 1)
    "DECISION: (0, 0, 1)",               # right, certain (label 2)
    "no decision here",                  # format failure
    "DECISION: (1, 0)",                  # certain and wrong (label 1)
    "DECISION: (1, 1)",                  # a tie on the true option (label 0): not an answer
]
LABELS = [0, 0, 1, 2, 0, 1, 0]
N_OPTS = [2, 2, 3, 3, 2, 2, 2]
# 2 options: labels 0,0,0,1,0 -> f(0) = 4/5, w0 = 1/(2*4/5) = 5/8, w1 = 1/(2/5) = 5/2;
# 3 options: labels 1, 2 -> w = 1/(3 * 1/2) = 2/3 each.
W = np.array([5 / 8, 5 / 8, 2 / 3, 2 / 3, 5 / 8, 5 / 2, 5 / 8])
FLOOR = 1e-12 / (1 + 1e-12)  # a zero score after the benchmark's clip and renormalisation


@pytest.fixture
def answers():
  return rewards.grade(COMPLETIONS, LABELS, N_OPTS, rewards.ClassBalance.of(LABELS, N_OPTS))


def test_correctness_and_format(answers):
  got = rewards.get_reward("correctness")(answers)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, W * [1, 0, 1, 1, 0, 0, 0], rtol=1e-6)
  np.testing.assert_array_equal(rewards.get_reward("format")(answers), [1, 1, 1, 1, 0, 1, 1])
  np.testing.assert_array_equal(answers.answered, [1, 1, 1, 1, 0, 1, 0])


def test_log_prob(answers):
  got = rewards.get_reward("log_prob")(answers)
  floor = math.log(1e-12)
  want = W * [math.log(0.8), math.log(0.25), math.log(0.5), math.log(1 / (1 + 2e-12)), floor,
              floor, math.log(0.5)]
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert rewards.LOG_PROB_FLOOR == pytest.approx(floor)


def test_brier(answers):
  got = rewards.get_reward("brier")(answers)
  p3 = np.array([1e-12, 1e-12, 1.0]) / (1 + 2e-12)  # (0, 0, 1) after clipping
  want = W * [
      -(0.2 ** 2 + 0.2 ** 2),
      -(0.75 ** 2 + 0.75 ** 2),
      -(0.2 ** 2 + 0.5 ** 2 + 0.3 ** 2),
      -float(np.sum((p3 - [0, 0, 1]) ** 2)),
      -2.0,
      -((1 - FLOOR) ** 2 + (FLOOR - 1) ** 2),
      -(0.5 ** 2 + 0.5 ** 2),
  ]
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


def test_combined_reward(answers):
  total, per = rewards.combined_reward(answers, {"correctness": 1.0, "format": 0.1})
  want = W * [1, 0, 1, 1, 0, 0, 0] + 0.1 * np.array([1, 1, 1, 1, 0, 1, 1])
  np.testing.assert_allclose(total, want, rtol=1e-6)
  assert set(per) == {"correctness", "format"}
  assert total.dtype == np.float32
  with pytest.raises(ValueError, match="empty"):
    rewards.combined_reward(answers, {})


def test_registry_user_reward_and_errors():
  name = "test_length_penalty"
  rewards.REWARDS.pop(name, None)

  @rewards.register_reward(name)
  def length_penalty(a):
    return -np.asarray([len(c) for c in a.texts], dtype=np.float32) / 100

  balance = rewards.ClassBalance.of([0, 1], [2, 2])
  try:
    a = rewards.grade(["DECISION: (1, 0)"], [0], [2], balance)
    total, _ = rewards.combined_reward(a, {"correctness": 2.0, name: 1.0})
    np.testing.assert_allclose(total, [2.0 - 0.16], rtol=1e-6)
    with pytest.raises(ValueError, match="already registered"):
      rewards.register_reward(name)(length_penalty)
  finally:
    rewards.REWARDS.pop(name, None)
  with pytest.raises(KeyError, match="unknown reward"):
    rewards.get_reward("nope")
  with pytest.raises(ValueError, match="label 2"):
    rewards.grade(["DECISION: (1, 0)"], [2], [2], balance)
  with pytest.raises(ValueError, match="same length"):
    rewards.grade(["a", "b"], [0], [2], balance)
