"""templates: DECISION lines, field clipping, longest-field-first fitting to a character or
token budget (counted), dispatch."""
import pytest

from data_pipeline import templates
from data_pipeline.build_report import BuildReport
from data_pipeline.example import Anchor, Example, Factor
from data_pipeline.readers import ct_open
from deepimagine_jax import rewards


def _question(**kw):
  ex = Example(id="q1", source="ctgov_xml", kind="question", trial_id="NCT1",
               title="A trial of X", endpoint="Pain at 4 weeks",
               arms=("X (experimental): X 10 mg", "Placebo (placebo comparator): matching"),
               options=("A beat B.", "A did not beat B."), label=1)
  return ex.replace(**kw)


def test_decision_line_is_one_hot_and_parses():
  assert templates.decision_line(2, 1) == "DECISION: (0, 1)"
  assert templates.decision_line(3, 0) == "DECISION: (1, 0, 0)"
  for n in (2, 3):
    for label in range(n):
      d = rewards.parse_decision(templates.decision_line(n, label), n)
      assert d.ok and d.choice == label
  with pytest.raises(ValueError):
    templates.decision_line(2, 2)
  with pytest.raises(ValueError):
    templates.decision_line(4, 0)


def test_clip_rule():
  assert templates.clip("  a   b  ", 10) == "a b"
  # cut at the last space inside the limit, mark with '...'
  assert templates.clip("alpha beta gamma delta", 14) == "alpha beta..."
  assert len(templates.clip("x" * 100, 20)) == 20
  assert templates.clip("x" * 100, 20).endswith("...")


def test_render_question_lists_options_and_instruction():
  q = _question()
  ex = templates.render(q)
  assert ex.completion == "DECISION: (0, 1)"
  assert q.prompt == "" and q.completion == ""  # the input is not changed
  p = ex.prompt
  assert "1. A beat B." in p and "2. A did not beat B." in p
  assert "DECISION: (s1, s2)" in p
  assert p.index("Trial:") < p.index("Endpoint:") < p.index("Arms:") < p.index("1. A beat")


def test_budget_holds_for_huge_fields():
  long = "word " * 3000
  q = _question(title=long, endpoint=long, arms=(long,) * 7, options=(long, long, long), label=2)
  ex = templates.render(q)
  assert len(ex.prompt) <= templates.PROMPT_CHAR_BUDGET
  assert "..." in ex.prompt and "(+3 more)" in ex.prompt
  assert ex.completion == "DECISION: (0, 0, 1)"
  anchor = Anchor.of(q.replace(label=0))
  factors = tuple(Factor(f, long, long) for f in ("dose", "country", "phase"))
  for kind in ("natural_pair", "approximate_pair", "chain"):
    pex = templates.render(q.replace(kind=kind, anchor=anchor, factors=factors))
    assert len(pex.prompt) <= templates.PROMPT_CHAR_BUDGET
    assert "Known result:" in pex.prompt and "Predict for:" in pex.prompt
  for i in range(3):
    prompt, _ = templates.render_chain_step(q.replace(anchor=anchor, factors=factors), i, long)
    assert len(prompt) <= templates.PROMPT_CHAR_BUDGET


def test_pair_shows_anchor_answer_and_factor():
  anchor = _question(id="a", label=0, endpoint="Pain at 2 weeks")
  target = _question(id="t", label=1)
  ex = templates.render(Example.pair(anchor, target, "natural_pair",
                                     [Factor("outcome", "Pain at 2 weeks", "Pain at 4 weeks")]))
  p = ex.prompt
  assert "Observed: A beat B." in p
  assert "- outcome: Pain at 2 weeks -> Pain at 4 weeks" in p
  assert p.index("Known result:") < p.index("Changed:") < p.index("Predict for:")
  assert ex.completion == "DECISION: (0, 1)"


def test_chain_step_completion_only_on_last_step():
  ex = _question(kind="chain", anchor=Anchor.of(_question(label=0)),
                 factors=(Factor("country", "Europe", "East Asia"),
                          Factor("dose", "10 mg", "20 mg")))
  p0, c0 = templates.render_chain_step(ex, 0, "A beat B.")
  p1, c1 = templates.render_chain_step(ex, 1, "A did not beat B.")
  assert c0 == "" and c1 == "DECISION: (0, 1)"
  assert "Current result: A beat B." in p0 and "step 1 of 2" in p0 and "country" in p0
  assert "dose: 10 mg -> 20 mg" in p1
  with pytest.raises(ValueError):
    templates.render_chain_step(ex, 2, "x")


def test_bad_examples_name_the_field():
  with pytest.raises(ValueError, match="unknown kind"):
    templates.render(_question(kind="essay"))
  with pytest.raises(ValueError, match="options"):
    templates.render(_question(options=("only one",), label=0))


def test_real_ct_open_questions_fit(full_data):
  qs = ct_open.read_questions(full_data / "ct_open" / "Winter_2025.pickle", BuildReport())
  assert len(qs) > 500
  for q in qs:
    ex = templates.render(q)
    assert len(ex.prompt) <= templates.PROMPT_CHAR_BUDGET
    d = rewards.parse_decision(ex.completion, len(q.options))
    assert d.ok and d.choice == q.label
    # the measure of the endpoint dict is shown, not its repr
    assert "{'measure'" not in ex.prompt


def test_fields_stay_whole_until_the_budget_needs_a_cut():
  q = _question(title="t " * 100)
  whole = templates.render(q)
  assert whole.prompt_fields_cut == 0 and ("t " * 99 + "t") in whole.prompt
  tight = templates.render(q, budget=len(whole.prompt) - 50)
  assert tight.prompt_fields_cut == 1 and len(tight.prompt) <= len(whole.prompt) - 50
  # only the longest field (the title) was cut; the others are whole
  assert "Endpoint: Pain at 4 weeks" in tight.prompt and "1. A beat B." in tight.prompt


def test_longest_fields_are_cut_first_to_one_level():
  """Water-filling, checked against a direct computation: cut fields end at one level L,
  uncut fields are shorter than L, and the prompt fits the budget."""
  lengths = {"title": 900, "endpoint": 700, "arm": 120}
  q = _question(title="a " * (lengths["title"] // 2), endpoint="b " * (lengths["endpoint"] // 2),
                arms=("c " * (lengths["arm"] // 2),))
  budget = 1200
  ex = templates.render(q, budget=budget)
  assert len(ex.prompt) <= budget and ex.prompt_fields_cut == 2
  lines = dict(line.split(": ", 1) for line in ex.prompt.split("\n") if ": " in line)
  title, endpoint, arm = lines["Trial"], lines["Endpoint"], lines["Arms"]
  assert title.endswith("...") and endpoint.endswith("...") and not arm.endswith("...")
  assert abs(len(title) - len(endpoint)) <= 2  # one common level (word-boundary cuts)
  assert len(arm) < len(title)
  whole = templates.render(q, budget=10_000).prompt
  # the level removes just what is needed: at most a few characters below the budget
  overhead = len(whole) - sum(len(x.strip()) for x in (q.title, q.endpoint, q.arms[0]))
  level = (budget - overhead - len(arm)) // 2
  assert level - 4 <= len(title) <= level


def test_fit_to_tokens_refits_only_what_is_over(monkeypatch):
  words = lambda text: len(text.split())  # a stand-in tokenizer: one token per word
  short = templates.render(_question())
  assert templates.fit_to_tokens(short, words, 1000) is short
  long = templates.render(_question(endpoint="word " * 400))
  assert words(long.prompt) > 200  # the character budget already cut it to ~290
  fitted = templates.fit_to_tokens(long, words, 120)
  assert words(fitted.prompt) <= 120 and fitted.prompt_fields_cut >= 1
  assert fitted.completion == long.completion and "1. A beat B." in fitted.prompt
  with pytest.raises(templates.PromptTooLong, match="example q1"):
    templates.fit_to_tokens(long, words, 5)


def test_pair_without_a_known_difference_says_so():
  anchor = _question(id="a", label=0)
  ex = templates.render(Example.pair(anchor, _question(id="t"), "approximate_pair", []))
  assert "Changed: no known factor differs" in ex.prompt


def test_chain_step_fits_tokens_when_asked():
  words = lambda text: len(text.split())
  ex = _question(kind="chain", endpoint="word " * 400, anchor=Anchor.of(_question(label=0)),
                 factors=(Factor("dose", "10 mg", "20 mg"),))
  p_chars, _ = templates.render_chain_step(ex, 0, "A beat B.")
  assert words(p_chars) > 150
  p_tok, c = templates.render_chain_step(ex, 0, "A beat B.", n_tokens=words, max_tokens=100)
  assert words(p_tok) <= 100 and "dose: 10 mg -> 20 mg" in p_tok and c == "DECISION: (0, 1)"


def test_imagine_request_shows_the_walk_so_far_and_asks_for_a_distribution():
  ex = _question(kind="chain", anchor=Anchor.of(_question(label=0, title="Anchor trial")),
                 factors=(Factor("population", "adult", "older adult"),
                          Factor("country", "Europe", "East Asia"),
                          Factor("dose", "10 mg", "20 mg")))
  p0 = templates.render_imagine_request(ex, 0, "A beat B.")
  p1 = templates.render_imagine_request(ex, 1, "A did not beat B.")
  assert "Changes already made" not in p0 and "- population: adult -> older adult" in p0
  assert p0.index("Observed: A beat B.") < p0.index("Result so far: A beat B.") < p0.index(
      "New change:") < p0.index("1. A beat B.") < p0.index("DECISION: (s1, s2)")
  assert p1.index("Changes already made:\n- population: adult -> older adult") < p1.index(
      "Result so far: A did not beat B.") < p1.index("New change:\n- country: Europe -> East Asia")
  assert "dose" not in p1 and "numbers in [0, 1] that sum to 1" in p1
  long = "word " * 3000
  tight = templates.render_imagine_request(ex.replace(title=long, endpoint=long), 1, long)
  assert len(tight) <= templates.PROMPT_CHAR_BUDGET and "New change:" in tight
  with pytest.raises(ValueError, match="step 3 of 3"):
    templates.render_imagine_request(ex, 3, "x")
  with pytest.raises(ValueError, match="needs an anchor"):
    templates.render_imagine_request(ex.replace(anchor=None), 0, "x")
