"""CT Open reader: counts, one record field by field, question invariants."""
import ast
import collections

import pytest

from data_pipeline import safe_pickle
from data_pipeline.build_report import BuildReport
from data_pipeline.readers import ct_open


@pytest.mark.parametrize("name,n_trials,n_questions", [
    ("Winter_2025", 314, 605), ("Summer_2025", 240, 857)])
def test_real_counts(full_data, name, n_trials, n_questions):
  path = full_data / "ct_open" / f"{name}.pickle"
  r = BuildReport()
  assert len(ct_open.read_questions(path, r)) == n_questions
  assert len(ct_open.read_trials(path, r)) == n_trials


@pytest.mark.parametrize("name", ["Winter_2025", "Summer_2025"])
def test_counts_match_raw(data_root, name):
  path = data_root / "ct_open" / f"{name}.pickle"
  raw = safe_pickle.load(path)
  r = BuildReport()
  qs = ct_open.read_questions(path, r)
  trials = ct_open.read_trials(path, r)
  assert len(qs) == sum(len(v["question_list_of_lists"]) for v in raw.values()) > 10
  assert len(trials) == len({k[0] for k in raw})
  assert r.n_skipped("ct_open") == r.n_skipped("ct_open", "dose_unknown_unit")
  assert len({q.id for q in qs}) == len(qs)
  for q in qs:  # independent check of label and category against the raw entry
    v = raw[(q.nct_id, q.endpoint_str)]
    opts = v["question_list_of_lists"][q.question_index]
    assert q.options[q.label] == v["answer_list_of_lists"][q.question_index]
    implicit = v["meta_label"] in ("no_arm", "no_distinguishable_arm")
    assert q.category == f"{len(opts)}-way/{'implicit' if implicit else 'explicit'}"
    endpoint = ast.literal_eval(q.endpoint_str)  # the key's endpoint is the one shown
    assert q.endpoint == ct_open.endpoint_line(endpoint)
    assert q.outcome_title == endpoint["measure"]
    assert q.prompt == "" and q.completion == "" and q.split == name
  cats = collections.Counter(q.category for q in qs)
  assert set(cats) <= {"2-way/explicit", "2-way/implicit", "3-way/explicit", "3-way/implicit"}


def test_telitacicept(full_data):
  path = full_data / "ct_open" / "Winter_2025.pickle"
  r = BuildReport()
  q = next(q for q in ct_open.read_questions(path, r, split="eval")
           if q.nct_id == "NCT05799287" and "UPCR" in q.endpoint_str)
  assert q.label == 0 and q.category == "2-way/explicit" and q.split == "eval"
  assert ast.literal_eval(q.endpoint_str)["timeFrame"] == "39 weeks"
  assert "Time frame: 39 weeks." in q.endpoint
  assert any("Telitacicept" in arm for arm in q.arms)
  t = next(t for t in ct_open.read_trials(path, r) if t.id == "NCT05799287")
  arm = next(a for a in t.arms if a.label == "Telitacicept")
  d = arm.interventions[0].doses[0]
  assert (d.amount, d.unit, d.route, d.frequency) == (240.0, "mg", "SC", "once weekly")
  assert any(o.title == "Change from baseline in urine protein creatinine ratio (UPCR)"
             and o.type == "primary" and o.values == () for o in t.outcomes)
