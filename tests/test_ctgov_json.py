"""API v2 JSON reader, checked field by field against the raw registry records."""
import pytest

from data_pipeline.build_report import BuildReport
from data_pipeline.readers.ctgov_json import read_ctgov_json


@pytest.fixture(scope="module")
def read(data_root):
  r = BuildReport()
  trials = read_ctgov_json(data_root / "ctgov_json", r)
  return {t.id: t for t in trials}, r


def test_counts(read):
  trials, r = read
  assert sorted(trials) == ["NCT00763412", "NCT02210780"]
  assert r.n_read("ctgov_json") == 2
  assert r.to_dict()["ctgov_json"]["skipped"]["no_results"]["examples"] == ["NCT00973089"]


def test_dupilumab_record(read):
  t = read[0]["NCT02210780"]
  assert (t.phase, t.enrollment, t.countries) == ("PHASE2", 194, ("United States",))
  # designInfo RANDOMIZED / maskingInfo TRIPLE; resultsFirstPostDateStruct 2020-05-07
  assert (t.allocation, t.masking, t.results_posted) == ("RANDOMIZED", "TRIPLE", "2020-05-07")
  assert [a.label for a in t.arms] == ["Placebo qw", "Dupilumab 300 mg qw"]
  dupi = t.arms[1].interventions[0]
  assert dupi.name == "Dupilumab"
  assert any(d.amount == 300.0 and d.unit == "mg" and d.frequency == "once weekly"
             for d in dupi.doses)
  iga = next(o for o in t.outcomes if o.title.startswith("Percentage of Participants Achieving"
                                                         " an Investigator's Global"))
  assert [(v.arm_id, v.arm_label, v.value, v.n) for v in iga.values] == [
      ("OG000", "Placebo qw", 10.3, 97), ("OG001", "Dupilumab 300 mg qw", 44.3, 97)]
  (an,) = iga.analyses
  assert (an.arm_ids, an.p_value, an.p_qualifier, an.method) == (
      ("OG000", "OG001"), 0.0001, "<", "Cochran-Mantel-Haenszel")
  assert (an.estimate, an.ci_low, an.ci_high, an.ci_pct) == (34.0, 24.29, 43.75, 90.0)
  assert iga.type == "secondary"


def test_repaglinide_record(read):
  t = read[0]["NCT00763412"]
  assert t.eligibility.min_age_years == 12.0 and t.eligibility.max_age_years == 24.0
  assert t.start_date == "2006-11" and t.enrollment == 31
  bmi = t.outcomes[0]
  assert bmi.title == "BMI" and bmi.unit == "Kg/m^2"
  assert [(v.arm_label, v.value, v.ci_low, v.ci_high) for v in bmi.values] == [
      ("1 Placebo", 19.63, 15.56, 22.64), ("2. repaglinide", 21.19, 20.78, 21.8)]
  (d,) = t.arms[1].interventions[0].doses
  assert (d.amount, d.unit) == (0.5, "mg")
