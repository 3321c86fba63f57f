"""Predictions: pickle and JSON-lines round trips, and scoring prediction texts."""
import json
import pickle

import numpy as np
import pytest

from data_pipeline import safe_pickle
from data_pipeline.build_report import BuildReport
from data_pipeline.example import Example
from deepimagine_jax.eval import metrics as M
from deepimagine_jax.eval import predictions as P

EP = "{'measure': 'Change in HbA1c', 'description': 'x', 'timeFrame': '12 weeks'}"
OPTS2 = ["This endpoint is met.", "This endpoint is not met."]
OPTS3 = ["Study Arm A is statistically significantly worse than Study Arm B.",
         "Study Arm B is statistically significantly worse than Study Arm A.",
         "No statistically significant difference between Study Arm B and Study Arm A."]


def _q(nct_id, endpoint_str, question_index, options, label, category):
  return Example(id=f"{nct_id}:{question_index}", source="ct_open", kind="question",
                 trial_id=nct_id, options=tuple(options), label=label, category=category,
                 nct_id=nct_id, endpoint_str=endpoint_str, question_index=question_index)


def _questions():
  return [_q("NCT01", EP, 0, OPTS2, 0, "2-way/implicit"),
          _q("NCT01", EP, 1, OPTS2, 1, "2-way/implicit"),
          _q("NCT02", "e\u00e9\"\n2", 0, OPTS3, 2, "3-way/explicit")]


def _preds():
  return {("NCT01", EP, 0): "reasoning...\nDECISION: (3, 7)\n\nREASON: <b>why</b>",
          ("NCT01", EP, 1): "**DECISION:** (0.2, 0.8)",
          ("NCT02", "e\u00e9\"\n2", 0): "DECISION: (1, 1, 2)"}


@pytest.mark.parametrize("name", ["preds.pkl", "preds.jsonl"])
def test_round_trip(tmp_path, name):
  path = tmp_path / "sub" / name
  writer = P.write_pickle if name.endswith(".pkl") else P.write_jsonl
  writer(path, _preds())
  assert P.read_predictions(path) == _preds()
  assert [p.name for p in path.parent.iterdir()] == [name]  # no temp file left behind


def test_pickle_is_plain_protocol_4(tmp_path):
  path = P.write_pickle(tmp_path / "p.pickle", _preds())
  data = path.read_bytes()
  assert data[:2] == b"\x80\x04"
  assert safe_pickle.load(path) == _preds()
  assert type(safe_pickle.load(path)) is dict


def test_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match="question_index"):
    P.write_pickle(tmp_path / "x.pkl", {("NCT01", EP, "0"): "DECISION: (1, 0)"})
  bad = tmp_path / "bad.pkl"
  bad.write_bytes(pickle.dumps([1, 2], protocol=4))
  with pytest.raises(TypeError, match="bad.pkl"):
    P.read_predictions(bad)
  with pytest.raises(ValueError, match="unknown predictions format"):
    P.read_predictions(tmp_path / "x.csv")


def test_jsonl_malformed_lines_counted(tmp_path):
  path = tmp_path / "p.jsonl"
  good = {"nct_id": "NCT01", "endpoint_str": EP, "question_index": 0, "text": "DECISION: (1, 0)"}
  lines = [json.dumps(good), "{not json", json.dumps({"nct_id": "NCT01"}),
           json.dumps(dict(good, question_index="0")), json.dumps(dict(good, text="again"))]
  path.write_text("\n".join(lines) + "\n")
  report = BuildReport()
  preds = P.read_predictions(path, report)
  assert preds == {("NCT01", EP, 0): "DECISION: (1, 0)"}
  assert report.n_skipped(P.SOURCE, "malformed_line") == 2
  assert report.n_skipped(P.SOURCE, "bad_field_type") == 1
  assert report.n_skipped(P.SOURCE, "duplicate_key") == 1
  assert report.n_read(P.SOURCE) == 1


def test_score_predictions_matches_direct_scoring(tmp_path):
  qs = _questions()
  path = P.write_jsonl(tmp_path / "p.jsonl", _preds())
  got = P.score_predictions(qs, [P.read_predictions(path)])
  want = M.score_run(qs, [[0.3, 0.7], [0.2, 0.8], [0.25, 0.25, 0.5]])
  for cat in ("2-way/implicit", "3-way/explicit", "overall"):
    for k in M.METRICS:
      assert got[cat][k] == pytest.approx(want[cat][k])
  assert got["overall"]["failures"] == {} and got["overall"]["coverage"] == 1.0


def test_probs_from_probabilities_round_trip():
  qs = _questions()
  probs = [np.array([0.125, 0.875]), np.array([0.5, 0.5]), np.array([0.1, 0.2, 0.7])]
  back, failures = P.answers_from_predictions(qs, P.predictions_from_probs(qs, probs))
  for a, b in zip(back, probs):
    np.testing.assert_allclose(a, b, rtol=1e-12)
  assert failures == {}


def test_missing_and_unparsed_are_counted_never_answered():
  qs = _questions()
  preds = {("NCT01", EP, 0): "no decision here", ("NCT01", EP, 1): "DECISION: (1, 0)"}
  answers, failures = P.answers_from_predictions(qs, preds)
  assert answers[0] is None and answers[2] is None
  np.testing.assert_allclose(answers[1], [1.0, 0.0], atol=1e-11)  # clipped at 1e-12 or not
  assert failures == {"missing": 1, "unparsed:no_decision_line": 1}
  scores = P.score_predictions(qs, [preds, preds])
  assert scores["overall"]["failures"] == {"missing": 2, "unparsed:no_decision_line": 2}
  assert (scores["overall"]["answered"], scores["overall"]["asked"]) == (1, 3)
  assert "3-way/explicit" in scores and scores["3-way/explicit"]["coverage"] == 0.0
  # the answered question (label 1, chose 0) is wrong; the strict table adds the failures
  assert scores["overall"]["balanced_accuracy"] == 0.0
  strict = P.score_predictions(qs, [preds], strict=True)
  assert strict["overall"]["n"] == 3 and strict["3-way/explicit"]["balanced_accuracy"] == 0.0
  with pytest.raises(ValueError, match="not asked"):
    P.score_predictions(qs[1:], [preds])
  with pytest.raises(TypeError, match="list"):
    P.score_predictions(qs, preds)


def test_main_scores_files_on_summer(tmp_path, data_root, monkeypatch, capsys):
  """The command line scores a prediction file on the real Summer release."""
  from data_pipeline.readers.ct_open import read_questions
  summer = read_questions(data_root / "ct_open" / "Summer_2025.pickle", BuildReport(),
                          split="eval")
  preds = P.predictions_from_probs(summer[:2], [np.full(q.n_options, 1 / q.n_options)
                                                for q in summer[:2]])
  path = P.write_pickle(tmp_path / "run0.pkl", preds)
  monkeypatch.setenv("DEEPIMAGINE_DATA", str(data_root))
  P.main([str(path)])
  out = capsys.readouterr().out
  assert f"'missing': {len(summer) - 2}" in out and "| predictions |" in out
  assert f"[2/{len(summer)}]" in out and "Strict" in out
