"""The per-arm operators' text: ESTIMATE lines, states whose values are never cut, the
training examples the build makes (arm_estimate, arm_compare) and what they require."""
import numpy as np
import pytest

from data_pipeline import build_stream, pairs, templates
from data_pipeline.example import Example, Factor

LONG = "a very long description of this arm " * 30


def _q(qid, trial, values=(503.0, 543.0), options=None, **kw):
  a, b = "Drug X 10 mg", "Placebo"
  options = options or (
      f"Study Arm {b} is statistically significantly worse than Study Arm {a}.",
      f"Study Arm {a} is statistically significantly worse than Study Arm {b}.",
      f"No statistically significant difference between Study Arm {a} and Study Arm {b}.")
  fields = dict(id=qid, source="ctgov_xml", kind="question", trial_id=trial, options=options,
                label=0, title=f"Trial {trial}", endpoint="HbA1c at week 24 (primary outcome).",
                arms=(f"{a} (experimental): X", f"{b} (placebo comparator): placebo"),
                arm_a=a, arm_b=b, unit="%", public_date="2020-01-01")
  if values is not None:
    fields.update(value_a=values[0], value_b=values[1])
  fields.update(kw)
  return Example(**fields)


def _pair(anchor, target, factors):
  kind = "chain" if len(factors) >= 2 else "approximate_pair"
  return Example.pair(anchor.replace(public_date="2019-01-01"), target, kind, factors)


def test_estimate_line_round_trip_and_malformed_lines():
  rs = np.random.RandomState(0)
  for a, b in rs.standard_normal((200, 2)) * 10.0 ** rs.randint(-3, 5, (200, 2)):
    line = templates.estimate_line(a, b)
    got = templates.parse_estimate(f"The dose doubles, so ... {line}")
    np.testing.assert_allclose(got, (a, b), rtol=5e-4)  # 4 significant digits
    assert got == (float(templates.format_value(a)), float(templates.format_value(b)))
  assert templates.parse_estimate("ESTIMATE: (1, 2)\nESTIMATE: (3.5, -.25)") == (3.5, -0.25)
  assert templates.parse_estimate("ESTIMATE: ( 1e-3 ,2E2 )") == (0.001, 200.0)
  for bad in ("", "ESTIMATE: (1)", "ESTIMATE: (a, b)", "ESTIMATE: (inf, 2)",
              "ESTIMATE: (1e999, 2)", "DECISION: (1, 0)", "estimate (1, 2)"):
    assert templates.parse_estimate(bad) is None, bad


def test_values_are_never_cut_from_a_prompt():
  """Names and sentences are cut to fit; the numbers a walk carries are not."""
  t = _q("t", "NCT2", title=LONG, endpoint=LONG, arms=(LONG, LONG))
  prompt, completion, cut = templates.render_arm_compare(
      t, templates.estimate_state(t, 503.0, 543.0), budget=700)
  assert len(prompt) <= 700 and cut > 0
  assert "Result\n" not in prompt and "Values: first arm 503 %; second arm 543 %" in prompt
  assert completion == "DECISION: (1, 0, 0)"
  anchor = _q("a", "NCT1", values=(12.25, 8.0), title=LONG)
  pair = _pair(anchor, t, [Factor("dose", "10 mg", "20 mg")])
  prompt, completion, cut = templates.render_arm_estimate_step(
      pair, 0, templates.anchor_state(pair.anchor), budget=700)
  assert len(prompt) <= 700 and cut > 0
  assert "first arm (" in prompt and " 12.25 %; second arm (" in prompt and " 8 %" in prompt
  assert completion == "ESTIMATE: (503, 543)"
  with pytest.raises(templates.PromptTooLong):
    templates.render_arm_compare(t, templates.estimate_state(t, 1.0, 2.0), budget=60)


def test_estimate_steps_and_completions():
  anchor, target = _q("a", "NCT1", values=(12.0, 8.0)), _q("t", "NCT2")
  steps = [Factor("dose", "10 mg", "20 mg"), Factor("outcome", "HbA1c", "weight")]
  chain = _pair(anchor, target, steps)
  assert templates.arm_estimate_steps(chain) == 2
  start = templates.anchor_state(chain.anchor)
  p0, c0, _ = templates.render_arm_estimate_step(chain, 0, start)
  assert c0 == "" and "Next change (step 1 of 2):\n- dose: 10 mg -> 20 mg" in p0
  assert start.text() in p0.replace("\nValues: ", " ")
  mid = templates.estimate_state(chain, 9.5, 8.25)
  p1, c1, _ = templates.render_arm_estimate_step(chain, 1, mid)
  assert c1 == "ESTIMATE: (503, 543)" and "Values: first arm 9.5 %; second arm 8.25 %" in p1
  assert "First arm: Drug X 10 mg\nSecond arm: Placebo" in p1
  unknown = _pair(anchor, target.replace(value_a=None, value_b=None), steps)
  assert templates.render_arm_estimate_step(unknown, 1, mid)[1] == ""  # no observed values
  none = _pair(anchor, target, [])
  assert templates.arm_estimate_steps(none) == 1
  assert "Next change: no known factor differs" in templates.render_arm_estimate_step(
      none, 0, start)[0]
  for bad in (-1, 2):
    with pytest.raises(ValueError, match="per-arm step"):
      templates.render_arm_estimate_step(chain, bad, start)
  ct_open_like = _pair(anchor.replace(value_a=None, value_b=None), target, steps)
  assert templates.anchor_state(ct_open_like.anchor).values is None  # starts from the sentence


def test_arms_from_the_options_and_none_for_endpoint_questions():
  q = _q("t", "NCT2", arm_a="", arm_b="")
  assert templates.compared_arms(q) == ("Drug X 10 mg", "Placebo")
  met = q.replace(options=("This endpoint is met.", "This endpoint is not met."))
  assert templates.compared_arms(met) is None
  with pytest.raises(ValueError, match="two compared arms"):
    templates.render_arm_estimate_step(_pair(_q("a", "NCT1"), met, []), 0,
                                       templates.ArmState("observed"))


def test_arm_examples_the_build_makes():
  anchor, target = _q("a", "NCT1", values=(12.0, 8.0)), _q("t", "NCT2")
  (compare,) = build_stream.arm_examples(target)
  assert compare.kind == "arm_compare" and compare.id == "arm_compare:t"
  compare = templates.render(compare)
  assert "Values: first arm 503 %; second arm 543 %" in compare.prompt
  assert compare.completion == "DECISION: (1, 0, 0)"
  assert list(build_stream.arm_examples(target.replace(value_b=None))) == []
  one = _pair(anchor, target, [Factor("dose", "10 mg", "20 mg")])
  (est,) = build_stream.arm_examples(one)
  assert est.kind == "arm_estimate" and est.id == "arm_estimate:a->t"
  assert est.perturbation == "dose"  # routed to the dose operator, like its pair
  est = templates.render(est)
  assert est.completion == "ESTIMATE: (503, 543)" and "12 %" in est.prompt
  natural = pairs.make_pair(anchor.replace(trial_id="NCT2"), target, "natural_pair",
                            [Factor("dose", "10 mg", "20 mg")])
  assert natural.completion.startswith("DECISION")  # make_pair renders the pair
  (nat_est,) = build_stream.arm_examples(natural)
  assert nat_est.kind == "arm_estimate" and templates.render(nat_est).completion.startswith(
      "ESTIMATE")
  two = _pair(anchor, target, [Factor("dose", "1", "2"), Factor("outcome", "x", "y")])
  assert list(build_stream.arm_examples(two)) == []  # intermediate values were never observed
  no_anchor_values = _pair(anchor.replace(value_a=None), target, [Factor("dose", "1", "2")])
  assert list(build_stream.arm_examples(no_anchor_values)) == []
  for bad in (est.replace(prompt="", anchor=None), compare.replace(prompt="", value_a=None)):
    with pytest.raises(ValueError, match="needs"):
      templates.render(bad)


def test_written_estimates_and_their_quality():
  """The world's read-out of per-arm walks: last written values per finished walk from an
  anchor with values, against the target's observed values (hand-computed reference)."""
  import types
  from deepimagine_jax.eval import imagining

  def walk(written, anchor_values, failed=""):
    steps = [{"values": v} for v in written] + [{"factor": "compare", "probs": [0.5, 0.5]}]
    return {"steps": steps, "anchor_values": anchor_values, "failed": failed}

  targets = [_q("t0", "NCT1", values=(3.0, 1.0)), _q("t1", "NCT2", values=(1.0, 2.0)),
             _q("t2", "NCT3", values=None)]
  trajs = [types.SimpleNamespace(details={"walks": [
               walk([[9.0, 9.0], [2.0, 1.0]], [1.0, 2.0]),  # the last values count
               walk([[7.0, 1.0]], None),  # an anchor without values: left out
               walk([[7.0, 1.0]], [1.0, 2.0], failed="estimate_unparsed")]}),
           types.SimpleNamespace(details={"walks": [walk([[0.0, 3.0]], [1.0, 0.0]),
                                                    walk([[5.0, 5.5]], [4.0, 3.0])]}),
           types.SimpleNamespace(details={"walks": [walk([[1.0, 1.0]], [1.0, 0.0])]})]
  written, anchor, observed = imagining.written_estimates(trajs, targets)
  np.testing.assert_array_equal(written, [[2, 1], [0, 3], [5, 5.5]])
  np.testing.assert_array_equal(anchor, [[1, 2], [1, 0], [4, 3]])
  np.testing.assert_array_equal(observed, [[3, 1], [1, 2], [1, 2]])
  q = imagining.estimate_quality(written, anchor, observed)
  d, a, o = np.array([1, -3, -0.5]), np.array([-1, 1, 1]), np.array([2, -1, -1])
  r = lambda x: np.sum((x - x.mean()) * (o - o.mean())) / np.sqrt(
      np.sum((x - x.mean()) ** 2) * np.sum((o - o.mean()) ** 2))
  assert q["n"] == 3
  assert q["written"]["sign_agreement"] == 1.0 and q["anchor"]["sign_agreement"] == 0.0
  assert q["written"]["diff_correlation"] == pytest.approx(r(d))
  assert q["anchor"]["diff_correlation"] == pytest.approx(r(a))
  assert q["written"]["mae"] == pytest.approx((1 + 0 + 1 + 1 + 4 + 3.5) / 6)
  assert q["anchor"]["mae"] == pytest.approx((2 + 1 + 0 + 2 + 3 + 1) / 6)
  empty = imagining.estimate_quality(*imagining.written_estimates([], []))
  assert empty["n"] == 0 and np.isnan(empty["written"]["sign_agreement"])
