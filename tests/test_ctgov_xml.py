"""Legacy XML reader, checked against values read by hand from the raw files."""
import pytest

from data_pipeline.build_report import BuildReport
from data_pipeline.readers.ctgov_xml import read_ctgov_xml


@pytest.fixture(scope="module")
def read(data_root):
  r = BuildReport()
  trials = read_ctgov_xml(data_root / "ctgov_xml", r)
  return {t.id: t for t in trials}, r


def test_counts(read, data_root):
  trials, r = read
  assert r.n_read("ctgov_xml") == len(trials)
  n_files = len(list((data_root / "ctgov_xml").glob("*.xml")))
  assert len(trials) + r.n_skipped("ctgov_xml", "no_results") == n_files > 200
  assert r.n_skipped("ctgov_xml", "bad_xml") == 0
  with_p = [o for t in trials.values() for o in t.outcomes
            if any(a.p_value is not None for a in o.analyses)]
  assert len(with_p) > 150


def test_peptide_t(read):
  t = read[0]["NCT00000392"]
  assert (t.phase, t.enrollment, t.countries) == ("PHASE2", 215, ("United States",))
  # <allocation>Randomized, <masking>Double (Participant, Care Provider),
  # <results_first_posted>August 4, 2015
  assert (t.allocation, t.masking, t.results_posted) == ("RANDOMIZED", "DOUBLE", "2015-08-04")
  assert (t.eligibility.sex, t.eligibility.min_age_years, t.eligibility.max_age_years) == (
      "ALL", 18.0, 60.0)
  assert [(a.label, a.type) for a in t.arms] == [
      ("Peptide T", "ACTIVE_COMPARATOR"), ("Placebo", "PLACEBO_COMPARATOR")]
  (d,) = t.arms[0].interventions[0].doses
  assert (d.amount, d.unit, d.route, d.frequency) == (2.0, "mg", "intranasal",
                                                      "three times daily")
  o = t.outcomes[0]
  assert o.title == "Change in Global Neurocognitive Performance z Score From Baseline"
  assert [(v.arm_id, v.arm_label, v.value, v.dispersion, v.n) for v in o.values] == [
      ("O1", "Peptide T", 0.24, 0.05, 66), ("O2", "Placebo", 0.16, 0.03, 77)]
  (an,) = o.analyses
  assert (an.p_value, an.p_qualifier, an.method) == (0.18, "=", "ANOVA")


def test_group_titles_kept(read):
  t = read[0]["NCT00495469"]
  o = t.outcomes[0]
  assert [(v.arm_id, v.arm_label, v.group_title) for v in o.values[:3]] == [
      ("O1", "Placebo", "Placebo"), ("O2", "GSK189075", "GSK189075 100 mg QD"),
      ("O3", "GSK189075", "GSK189075 250 mg QD")]


def test_botox_japan(read):
  t = read[0]["NCT00460564"]
  assert (t.phase, t.enrollment, t.countries) == ("PHASE3", 109, ("Japan",))
  assert t.eligibility.min_age_years == 20.0
  assert [a.label for a in t.arms] == ["High-Dose BTX", "High-Dose Placebo", "Low-Dose BTX",
                                       "Low-Dose Placebo"]
  assert [i.name for i in t.arms[0].interventions] == ["GSK1358820"]
  o = t.outcomes[0]
  assert [(v.arm_label, v.value, v.dispersion, v.n) for v in o.values] == [
      ("High-Dose BTX", -10.397, 8.9313, 51), ("High-Dose Placebo", -3.567, 4.7189, 26)]
  (an,) = o.analyses
  assert (an.p_value, an.p_qualifier, an.estimate, an.ci_low, an.ci_high, an.ci_pct) == (
      0.001, "<", -6.83, -10.567, -3.093, 95.0)
