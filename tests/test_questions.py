"""questions: labels checked against raw XML read here, CT Open wording, skip rules."""
import re
import xml.etree.ElementTree as ET

import pytest

from data_pipeline import questions
from data_pipeline.build_report import BuildReport
from data_pipeline.readers import ct_open, ctgov_xml
from data_pipeline.schema import Analysis, Arm, ArmValue, Outcome, Trial

XML_IDS = ("NCT00000620", "NCT00002597", "NCT00002874", "NCT00005947", "NCT00492752",
           "NCT00499460")


def _raw_p(text: str):
  """My own reading of a registry p-value: (value, qualifier)."""
  m = re.fullmatch(r"\s*([<>]=?|=)?\s*(\d*\.?\d+(?:[eE]-?\d+)?)\s*", text)
  assert m, text
  return float(m.group(2)), m.group(1) or "="


def _raw_outcomes(path):
  root = ET.parse(path).getroot()
  return {o.findtext("title").strip(): o
          for o in root.findall("clinical_results/outcome_list/outcome")}


def test_xml_labels_match_raw_p_values(data_root):
  paths = [data_root / "ctgov_xml" / f"{i}.xml" for i in XML_IDS]
  report = BuildReport()
  trials = ctgov_xml.read_ctgov_xml(paths, report)
  qs = questions.derive_all(trials, report)
  checked = {"superiority": 0, "comparative": 0, "neutral_higher": 0, "endpoint_met": 0}
  for q in qs:
    raw = _raw_outcomes(data_root / "ctgov_xml" / f"{q.trial_id}.xml")[q.outcome_title]
    j = int(re.search(r":a(\d+):", q.id).group(1))
    an = raw.findall("analysis_list/analysis")[j]
    gids = {g.text.strip() for g in an.findall("group_id_list/group_id")}
    assert gids == {q.group_a_id, q.group_b_id}
    p, qual = _raw_p(an.findtext("p_value"))
    sig = p < 0.05 or (qual == "<" and p <= 0.05)
    assert sig or qual in ("=", ">", ">=")  # anything else must have been skipped
    vals = {m.get("group_id"): float(m.get("value")) for m in raw.findall(
        "measure/class_list/class/category_list/category/measurement_list/measurement")}
    a_higher = vals[q.group_a_id] > vals[q.group_b_id]
    assert vals[q.group_a_id] != vals[q.group_b_id]
    if q.question_type == "neutral_higher":
      assert q.polarity == "unknown" and q.label_basis == "neutral_unknown_polarity"
      assert q.label == (0 if a_higher else 1)
    else:
      assert q.polarity in ("higher_better", "lower_better")
      a_better = a_higher == (q.polarity == "higher_better")
      expected = {"superiority": 0 if sig and a_better else 1,
                  "endpoint_met": 0 if sig and a_better else 1,
                  "comparative": 2 if not sig else (0 if a_better else 1)}[q.question_type]
      assert q.label == expected, q.id
    checked[q.question_type] += 1
  assert checked["superiority"] >= 10 and checked["neutral_higher"] >= 3
  assert checked["endpoint_met"] >= 1
  labels = {q.label for q in qs if q.question_type == "superiority"}
  assert labels == {0, 1}  # both outcomes occur in these trials


def test_options_copy_ct_open_wording(full_data):
  qs = ct_open.read_questions(full_data / "ct_open" / "Winter_2025.pickle", BuildReport())
  n2 = n3 = 0
  for q in qs:
    arms = questions.arms_from_options(q.options)
    if q.meta_label in ("no_arm",):
      assert q.options == questions.ENDPOINT_OPTIONS
      continue
    if arms is None:
      continue
    if len(q.options) == 2:
      assert q.options == questions.superiority_options(*arms)
      n2 += 1
    else:
      assert q.options == questions.comparative_options(*arms)
      n3 += 1
  assert n2 > 300 and n3 > 20


def _trial(polarity="higher_better", analyses=None, values=None, arms=None,
           title="Response rate at week 12"):
  arms = arms or (Arm("P1", "Drug X", "EXPERIMENTAL", "X 10 mg"),
                  Arm("P2", "Placebo", "PLACEBO_COMPARATOR", "matching placebo"))
  values = values or (ArmValue("O1", "Placebo", 40.0), ArmValue("O2", "Drug X", 55.0))
  analyses = analyses if analyses is not None else (
      Analysis(("O1", "O2"), 0.001, "<", "ANCOVA", "Mean Difference", 15.0, None, None,
               None, "Superiority"),)
  out = Outcome(title, "", "primary", "12 weeks", "%", "Mean",
                values, analyses, polarity)
  return Trial("NCT0TEST", "ctgov_xml", "A trial of X", "PHASE2", ("Pain",), ("France",),
               100, "", "", arms, (out,), None)


def test_unknown_polarity_gives_only_the_neutral_question():
  qs = questions.derive_questions(_trial(polarity="unknown"))
  assert [q.question_type for q in qs] == ["neutral_higher"]
  assert qs[0].label_basis == "neutral_unknown_polarity"
  assert qs[0].options[qs[0].label].startswith("Study Arm Drug X has a higher value")


def test_known_polarity_labels_and_study_arm_first():
  qs = {q.question_type: q for q in questions.derive_questions(_trial())}
  assert set(qs) == {"superiority", "comparative", "endpoint_met"}
  # Placebo is listed first in the analysis; the study arm is still Drug X.
  assert qs["superiority"].arm_a == "Drug X" and qs["superiority"].label == 0
  # each arm's observed value follows it when the study arm is put first
  assert [(q.value_a, q.value_b, q.unit) for q in qs.values()] == [(55.0, 40.0, "%")] * 3
  assert qs["comparative"].label == 0 and qs["endpoint_met"].label == 0
  low = {q.question_type: q for q in questions.derive_questions(
      _trial("lower_better", title="Pain score at week 12"))}
  assert low["superiority"].label == 1 and low["comparative"].label == 1


@pytest.mark.parametrize("p,qual,sig", [
    (0.001, "<", True), (0.049, "=", True), (0.05, "<", True), (0.05, "=", False),
    (0.05, ">", False), (0.3, "=", False), (0.04, "<=", True),
    (0.01, ">", None), (0.05, "<=", None), (0.2, "<", None)])
def test_significance_rule(p, qual, sig):
  an = Analysis(("O1", "O2"), p, qual, "", "", None, None, None, None, "")
  assert questions.significance(an) is sig


def test_undetermined_records_are_skipped_and_counted():
  def ana(ids=("O1", "O2"), p=0.01, q="=", ni="Superiority"):
    return Analysis(ids, p, q, "", "", None, None, None, None, ni)
  cases = {
      "analysis_not_pairwise": _trial(analyses=(ana(ids=("O1", "O2", "O3")),)),
      "non_inferiority_analysis": _trial(analyses=(ana(ni="Non-Inferiority or Equivalence"),)),
      "no_p_value": _trial(analyses=(ana(p=None, q=""),)),
      "p_value_undetermined": _trial(analyses=(ana(p=0.01, q=">"),)),
      "no_arm_values": _trial(values=(ArmValue("O1", "Placebo", 40.0),)),
      "equal_arm_values": _trial(values=(ArmValue("O1", "Placebo", 40.0),
                                         ArmValue("O2", "Drug X", 40.0))),
      "ambiguous_arm_label": _trial(values=(ArmValue("O1", "Drug X", 40.0),
                                            ArmValue("O2", "Drug X", 50.0))),
  }
  for reason, trial in cases.items():
    report = BuildReport()
    assert questions.derive_questions(trial, report) == [], reason
    assert report.n_skipped("questions:ctgov_xml", reason) == 1, reason


def test_time_to_event_polarity_from_the_reader(data_root):
  """NCT00005044 reports 'Time to ...' outcomes: a longer time to progression is better."""
  t = ctgov_xml.read_ctgov_xml([data_root / "ctgov_xml" / "NCT00005044.xml"], BuildReport())[0]
  timed = [o for o in t.outcomes if o.title.lower().startswith("time to")]
  assert timed and all(o.polarity == "higher_better" for o in timed
                       if "progression" in o.title.lower() or "failure" in o.title.lower())
  for q in questions.derive_all([t]):
    if q.outcome_title.lower().startswith("time to"):
      assert q.polarity == "higher_better" and q.question_type != "neutral_higher"


def test_dose_groups_of_one_arm_are_named_by_group_title(data_root):
  """NCT00495469: one protocol arm 'GSK189075', result groups '... 100/250/500/1000 mg QD'."""
  t = ctgov_xml.read_ctgov_xml([data_root / "ctgov_xml" / "NCT00495469.xml"], BuildReport())[0]
  report = BuildReport()
  qs = questions.derive_all([t], report)
  assert report.n_skipped("questions:ctgov_xml", "ambiguous_arm_label") == 0
  o0 = [q for q in qs if q.outcome_index == 0 and q.question_type == "superiority"
        and q.arm_a.startswith("GSK")]
  names = {q.arm_a for q in o0}
  assert {"GSK189075 100 mg QD", "GSK189075 250 mg QD", "GSK189075 500 mg QD",
          "GSK189075 1000 mg QD", "GSK189075 250 mg BID"} <= names
  assert all(q.arm_b == "Placebo" and q.arm_a_id for q in o0)
  for q in o0:  # the group title names the arm inside the option sentence
    assert q.options == questions.superiority_options(q.arm_a, "Placebo")
    assert q.group_a_title == q.arm_a
  # the raw file: O5 (1000 mg QD) vs placebo p=0.001, lower HbA1c -> significant improvement
  q1000 = next(q for q in o0 if q.arm_a == "GSK189075 1000 mg QD")
  assert q1000.polarity == "lower_better" and q1000.label == 0


def test_group_titles_that_collide_stay_ambiguous():
  vals = (ArmValue("O1", "Drug X", 40.0, group_title="X"),
          ArmValue("O2", "Drug X", 50.0, group_title="X"))
  report = BuildReport()
  assert questions.derive_questions(_trial(values=vals), report) == []
  assert report.n_skipped("questions:ctgov_xml", "ambiguous_arm_label") == 1
  vals = (ArmValue("O1", "Drug X", 40.0, group_title="X 10 mg"),
          ArmValue("O2", "Drug X", 50.0, group_title="X 20 mg"))
  qs = questions.derive_questions(_trial(values=vals))
  assert {(q.arm_a, q.arm_b) for q in qs} == {("X 10 mg", "X 20 mg")}
