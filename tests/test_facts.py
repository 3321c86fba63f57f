"""facts: factor values read from a Trial, and their comparison."""
import dataclasses

from data_pipeline import facts
from data_pipeline.example import Facts


def test_group_dose_from_title():
  assert facts.group_dose("GSK189075 250 mg BID") == ("250 mg", "twice daily")
  assert facts.group_dose("GSK189075 100 mg QD") == ("100 mg", "once daily")
  assert facts.group_dose("Cohort A") == ("", "")
  assert facts.group_dose("X 10 mg then 20 mg") == ("", "")  # two amounts: no single dose


def test_one_sided_unknown_factor_rejects_the_pair():
  a = Facts(country="Europe", phase="", outcome="pain")
  b = Facts(country="Europe", phase="PHASE2", outcome="pain")
  assert facts.compare_facts(a, b, ("country", "phase")) is None
  c = dataclasses.replace(b, phase="")
  assert facts.compare_facts(a, c, ("country", "phase")) == ([], ["phase"])
