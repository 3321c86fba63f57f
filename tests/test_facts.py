"""facts: factor values read from a Trial, and their comparison."""
import dataclasses

from data_pipeline import facts
from data_pipeline.example import Facts


def test_group_dose_from_title():
  assert facts.group_dose("GSK189075 250 mg BID") == ("250 mg", "twice daily")
  assert facts.group_dose("GSK189075 100 mg QD") == ("100 mg", "once daily")
  assert facts.group_dose("Cohort A") == ("", "")
  assert facts.group_dose("X 10 mg then 20 mg") == ("", "")  # two amounts: no single dose


def test_factors_unknown_on_either_side_are_no_step():
  a = Facts(country="Europe", phase="", outcome="pain", drug="x", dose="10 mg")
  b = Facts(country="Europe", phase="PHASE2", outcome="pain", drug="y", dose="20 mg")
  # phase is known on one side only: it cannot be compared, so it is listed, not a step
  assert facts.compare_facts(a, b, ("country", "phase")) == ([], ["phase"])
  c = dataclasses.replace(b, phase="")
  assert facts.compare_facts(a, c, ("country", "phase")) == ([], ["phase"])
  # steps come in the order asked for, values anchor -> target
  steps, unknown = facts.compare_facts(a, b, ("dose", "drug", "phase", "country"))
  assert [(f.factor, f.anchor_value, f.target_value) for f in steps] == [
      ("dose", "10 mg", "20 mg"), ("drug", "x", "y")]
  assert unknown == ["phase"]


def test_text_factors_compare_by_word_overlap():
  a = Facts(outcome="Change in pain score at week 12", condition="Chronic low back pain")
  b = Facts(outcome="Pain score change from baseline", condition="Low back pain, chronic")
  assert facts.compare_facts(a, b, ("outcome", "condition")) == ([], [])
  c = Facts(outcome="HbA1c", condition="Type 2 diabetes")
  steps, _ = facts.compare_facts(a, c, ("outcome", "condition"))
  assert [f.factor for f in steps] == ["outcome", "condition"]
  # {pain, score} shared of {pain, score, relief}; "change", "at", "week" are stop words
  assert facts.text_overlap("pain score relief", "Pain score change at week") == 2 / 3


def test_size_bucket_edges():
  assert [facts.size_bucket(n) for n in (None, 0, 49, 50, 99, 100, 299, 300, 999, 1000)] == [
      "", "<50", "<50", "50-99", "50-99", "100-299", "100-299", "300-999", "300-999", ">=1000"]
