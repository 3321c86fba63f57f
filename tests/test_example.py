"""Example: one typed record; exact JSON round trip; errors that name the id and field."""
import dataclasses
import json

import pytest

from data_pipeline import templates
from data_pipeline.example import (Anchor, Example, ExampleError, Factor, Facts, SyntheticTask)


def _q(**kw):
  q = Example(id="q", source="ctgov_xml", kind="question", trial_id="NCT1", options=("a", "b"),
              label=1, title="T", endpoint="E", arms=("A", "B"), question_type="superiority")
  return q.replace(**kw)


def _round_trip(ex):
  return Example.from_json(json.loads(json.dumps(ex.to_json())))


def test_every_kind_round_trips_exactly():
  q = _q(facts=Facts(country="Europe", drugs=("x",)))
  pair = Example.pair(_q(id="a"), q, "approximate_pair", [Factor("dose", "10 mg", "20 mg")],
                      unknown_factors=("phase",), similarity=0.25)
  syn = Example(id="s", source="synthetic", kind="synthetic", trial_id="S", options=("u", "d"),
                label=0, synthetic=SyntheticTask(10, 20, -1, 30))
  for ex in (q, pair, templates.render(pair), syn):
    assert _round_trip(ex) == ex
  assert set(q.to_json()) == {f.name for f in dataclasses.fields(Example)}


def test_pair_takes_the_target_question_and_the_anchor_answer():
  anchor, target = _q(id="a", trial_id="NCT0", label=0), _q(id="t", facts=Facts())
  p = Example.pair(anchor, target, "chain", [Factor("phase", "1", "2"), Factor("dose", "1", "2")])
  assert (p.id, p.kind, p.perturbation) == ("chain:a->t", "chain", "dose+phase")
  assert p.anchor == Anchor.of(anchor) and p.anchor.answer == "a"
  assert (p.anchor_trial_id, p.label, p.facts) == ("NCT0", 1, None)
  with pytest.raises(dataclasses.FrozenInstanceError):
    p.label = 0


def test_bad_records_name_the_id_and_field():
  rec = _q().to_json()
  with pytest.raises(ExampleError, match=r"'q'.*'label'.*integer"):
    Example.from_json({**rec, "label": True})
  with pytest.raises(ExampleError, match=r"'q'.*'options\[1\]'.*string"):
    Example.from_json({**rec, "options": ["a", 2]})
  with pytest.raises(ExampleError, match=r"'q'.*unknown field.*'arms_text'"):
    Example.from_json({**rec, "arms_text": "x"})
  with pytest.raises(ExampleError, match=r"'q'.*missing field.*'label'"):
    Example.from_json({k: v for k, v in rec.items() if k != "label"})
  bad_factor = {"factor": "dose", "anchor_value": 1, "target_value": ""}
  with pytest.raises(ExampleError, match=r"'q'.*'factors\[0\]\.anchor_value'"):
    Example.from_json({**rec, "factors": [bad_factor]})
