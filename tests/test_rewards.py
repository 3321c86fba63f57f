"""DECISION parsing and reward functions against hand-computed values."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from deepimagine_jax import rewards

GOOD = [
    # (text, n_options, expected probs, expected choice)
    ("DECISION: (0.7, 0.3)", 2, [0.7, 0.3], 0),
    ("DECISION: (1,0)", 2, [1.0, 0.0], 0),
    ("DECISION: (0.2, 0.5, 0.3)", 3, [0.2, 0.5, 0.3], 1),
    ("DECISION: (2, 6)", 2, [0.25, 0.75], 1),
    ("DECISION: (1e-3, 3e-3)", 2, [0.25, 0.75], 1),
    ("DECISION: (1E2, 3.0e+2, 0)", 3, [0.25, 0.75, 0.0], 1),
    ("DECISION: (.5, 1.)", 2, [1 / 3, 2 / 3], 1),
    ("DECISION: (+1, 3)", 2, [0.25, 0.75], 1),
    ("DECISION: (0.5, 0.5)", 2, [0.5, 0.5], 0),  # tie: lowest index
    ("DECISION: (1, 2, 2)", 3, [0.2, 0.4, 0.4], 1),  # tie: lowest index
    ("DECISION: (-0, 1)", 2, [0.0, 1.0], 1),  # negative zero is zero
    ("DECISION: (0.7, 0.3).", 2, [0.7, 0.3], 0),
    ("DECISION: (0.7, 0.3)   \n", 2, [0.7, 0.3], 0),
    ("DECISION:(0.7,0.3)", 2, [0.7, 0.3], 0),
    ("DECISION: ( 0.7 ,  0.3 )", 2, [0.7, 0.3], 0),
    ("DECISION: (1e300, 1e300)", 2, [0.5, 0.5], 0),  # no overflow in the sum
    ("The dose doubled, so the effect grows.\nOption 2 fits.\nDECISION: (0.1, 0.9)",
     2, [0.1, 0.9], 1),
    # the last DECISION wins, as in the benchmark
    ("DECISION: (0.9, 0.1)\nOn reflection...\nDECISION: (0.2, 0.8)", 2, [0.2, 0.8], 1),
    # benchmark strips markdown before parsing
    ("**DECISION:** (0.6, 0.4)", 2, [0.6, 0.4], 0),
    ("## DECISION: (0.6, 0.4)", 2, [0.6, 0.4], 0),
    ("```\nDECISION: (0.6, 0.4)\n```", 2, [0.6, 0.4], 0),
    ("My final DECISION: (0.3, 0.7)", 2, [0.3, 0.7], 1),
    ("DECISION: (0.7, 0.3)\r\n", 2, [0.7, 0.3], 0),
]

BAD = [
    # (text, n_options, expected error code)
    ("", 2, "no_decision_line"),
    ("I think option 1.", 2, "no_decision_line"),
    ("decision: (1,0)", 2, "no_decision_line"),  # case-sensitive, as the benchmark
    ("Decision: (0.7, 0.3)", 2, "no_decision_line"),
    ("DECISION (0.7, 0.3)", 2, "no_decision_line"),
    ("DECISION: 0.7, 0.3", 2, "no_open_paren"),
    ("DECISION: [0.7, 0.3]", 2, "no_open_paren"),
    ("DECISION:\n(0.7, 0.3)", 2, "no_open_paren"),  # must be on the same line
    ("DECISION: (0.7, 0.3", 2, "unbalanced_parens"),
    ("DECISION: ((0.7, 0.3))", 2, "unbalanced_parens"),
    ("DECISION: (0.7, 0.3))", 2, "unbalanced_parens"),
    ("DECISION: (0.7, 0.3) because option 1", 2, "trailing_text"),
    ("DECISION: (0.7, 0.3)..", 2, "trailing_text"),
    ("DECISION: (0.7, 0.3, 0.0)", 2, "wrong_count"),
    ("DECISION: (0.7)", 2, "wrong_count"),
    ("DECISION: (0.7, 0.3)", 3, "wrong_count"),
    ("DECISION: (1, 0,)", 2, "wrong_count"),
    ("DECISION: ()", 2, "wrong_count"),
    ("DECISION: (0.7, -0.3)", 2, "negative"),
    ("DECISION: (-1e-3, 1)", 2, "negative"),
    ("DECISION: (nan, 1)", 2, "non_finite"),
    ("DECISION: (inf, 1)", 2, "non_finite"),
    ("DECISION: (1e999, 1)", 2, "non_finite"),
    ("DECISION: (high, low)", 2, "non_numeric"),
    ("DECISION: (70%, 30%)", 2, "non_numeric"),
    ("DECISION: (0x1, 0)", 2, "non_numeric"),
    ("DECISION: (True, False)", 2, "non_numeric"),
    ("DECISION: (1_0, 0)", 2, "non_numeric"),
    ("DECISION: (, 1)", 2, "non_numeric"),
    ("DECISION: (0, 0)", 2, "all_zero"),
    ("DECISION: (0.0, 0e5, 0)", 3, "all_zero"),
    # a good line followed by a bad last line: the last one decides
    ("DECISION: (0.9, 0.1)\nDECISION: maybe", 2, "no_open_paren"),
    (None, 2, "not_text"),
    (b"DECISION: (1, 0)", 2, "not_text"),
    ("DECISION: (1, 0)", 0, "bad_n_options"),
    ("DECISION: (1, 0)", True, "bad_n_options"),
]


@pytest.mark.parametrize("text,n,probs,choice", GOOD)
def test_parse_good(text, n, probs, choice):
  d = rewards.parse_decision(text, n)
  assert d.ok, d.error
  assert d.error == ""
  assert d.probs.dtype == np.float64
  np.testing.assert_allclose(d.probs, probs, rtol=1e-12, atol=1e-15)
  assert math.isclose(d.probs.sum(), 1.0, rel_tol=1e-12)
  assert d.choice == choice


@pytest.mark.parametrize("text,n,code", BAD)
def test_parse_bad(text, n, code):
  d = rewards.parse_decision(text, n)
  assert not d.ok
  assert d.probs is None and d.choice is None
  assert d.error_code == code, d.error
  assert code in rewards.ERROR_CODES


@settings(max_examples=300, deadline=None)
@given(st.text(), st.integers(min_value=-2, max_value=5))
def test_parse_never_raises_on_any_text(text, n):
  d = rewards.parse_decision(text, n)
  assert d.error_code != "internal", d.error
  if d.ok:
    assert np.all(d.probs >= 0) and math.isclose(d.probs.sum(), 1.0, rel_tol=1e-9)


_score = st.one_of(
    st.floats(min_value=0, max_value=1e6, allow_nan=False).map(repr),
    st.integers(min_value=-3, max_value=100).map(str),
    st.sampled_from(["nan", "inf", "-1", "x", "", "1e999", "0", ".5", "1."]))


@settings(max_examples=300, deadline=None)
@given(st.lists(_score, min_size=0, max_size=4), st.text(max_size=20),
       st.text(max_size=8), st.integers(min_value=1, max_value=3))
def test_parse_never_raises_near_valid(scores, before, after, n):
  """Fuzz around the valid shape, where the interesting branches are."""
  text = f"{before}\nDECISION: ({', '.join(scores)}){after}"
  d = rewards.parse_decision(text, n)
  assert d.error_code != "internal", d.error
  if d.ok:
    raw = np.array([float(s) for s in scores])
    np.testing.assert_allclose(d.probs, raw / raw.sum(), rtol=1e-12)
    assert d.choice == int(np.argmax(raw))


def test_parse_matches_benchmark_reading():
  """On well-formed lines we agree with the benchmark's own arithmetic."""
  import ast
  for text, n, _, _ in GOOD:
    out = text.replace("*", "").replace("#", "").replace("```python", "").replace("```", "")
    conf = out.split("DECISION:")[-1].strip().split("\n")[0].strip()
    raw = np.array(ast.literal_eval(conf.split(")")[0] + ")"), dtype=np.float64)
    d = rewards.parse_decision(text, n)
    np.testing.assert_allclose(d.probs, raw / raw.sum(), rtol=1e-12)
    assert d.choice == int(np.argmax(raw / raw.sum()))


COMPLETIONS = [
    "reasoning\nDECISION: (0.8, 0.2)",   # right, p=0.8
    "DECISION: (0.25, 0.75)",            # wrong (label 0)
    "DECISION: (0.2, 0.5, 0.3)",         # right (label 1)
    "DECISION: (0, 0, 1)",               # right with certainty (label 2)
    "no decision here",                  # format failure
    "DECISION: (1, 0)",                  # certain and wrong (label 1)
]
LABELS = [0, 0, 1, 2, 0, 1]
N_OPTS = [2, 2, 3, 3, 2, 2]


def test_correctness_and_format():
  np.testing.assert_array_equal(
      rewards.get_reward("correctness")(COMPLETIONS, LABELS, N_OPTS), [1, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(
      rewards.get_reward("format")(COMPLETIONS, LABELS, N_OPTS), [1, 1, 1, 1, 0, 1])


def test_log_prob():
  got = rewards.get_reward("log_prob")(COMPLETIONS, LABELS, N_OPTS)
  floor = math.log(1e-12)
  want = [math.log(0.8), math.log(0.25), math.log(0.5), 0.0, floor, floor]
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert rewards.LOG_PROB_FLOOR == pytest.approx(floor)


def test_brier():
  got = rewards.get_reward("brier")(COMPLETIONS, LABELS, N_OPTS)
  want = [
      -(0.2 ** 2 + 0.2 ** 2),
      -(0.75 ** 2 + 0.75 ** 2),
      -(0.2 ** 2 + 0.5 ** 2 + 0.3 ** 2),
      0.0,
      -2.0,
      -(1.0 + 1.0),
  ]
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_combined_reward():
  total, per, fmt = rewards.combined_reward(
      COMPLETIONS, LABELS, N_OPTS, {"correctness": 1.0, "format": 0.1})
  np.testing.assert_allclose(total, [1.1, 0.1, 1.1, 1.1, 0.0, 0.1], rtol=1e-6)
  assert set(per) == {"correctness", "format"}
  np.testing.assert_array_equal(fmt, [True, True, True, True, False, True])
  assert total.dtype == np.float32 and fmt.dtype == bool


def test_registry_user_reward_and_errors():
  name = "test_length_penalty"
  rewards.REWARDS.pop(name, None)

  @rewards.register_reward(name)
  def length_penalty(completions, labels, n_options):
    return -np.asarray([len(c) for c in completions], dtype=np.float32) / 100

  try:
    total, per, _ = rewards.combined_reward(["DECISION: (1, 0)"], [0], [2],
                                            {"correctness": 2.0, name: 1.0})
    np.testing.assert_allclose(total, [2.0 - 0.16], rtol=1e-6)
    with pytest.raises(ValueError, match="already registered"):
      rewards.register_reward(name)(length_penalty)
  finally:
    rewards.REWARDS.pop(name, None)
  with pytest.raises(KeyError, match="unknown reward"):
    rewards.get_reward("nope")
  with pytest.raises(ValueError, match="label 2"):
    rewards.get_reward("correctness")(["DECISION: (1, 0)"], [2], [2])
  with pytest.raises(ValueError, match="same length"):
    rewards.get_reward("correctness")(["a", "b"], [0], [2])
