"""Dose parsing on hand-written strings, and robustness on arbitrary text."""
import hypothesis
import hypothesis.strategies as st
import pytest

from data_pipeline.build_report import BuildReport
from data_pipeline.doses import intervention_doses, parse_doses


@pytest.mark.parametrize("text,amount,high,unit,route,freq", [
    ("240 mg SC once a week", 240.0, None, "mg", "SC", "once weekly"),
    ("10 mg/kg IV every 3 weeks", 10.0, None, "mg/kg", "IV", "every 3 weeks"),
    ("0.5 mg twice daily", 0.5, None, "mg", "", "twice daily"),
    ("100-200 mg", 100.0, 200.0, "mg", "", ""),
    ("5 mcg", 5.0, None, "mcg", "", ""),
    ("50 µg inhaled BID", 50.0, None, "mcg", "inhaled", "twice daily"),
    ("2 x 10^6 cells/kg", 2e6, None, "cells/kg", "", ""),
    ("75 mg/m² IV q3w", 75.0, None, "mg/m2", "IV", "every 3 weeks"),
    ("1,000 mg/day orally", 1000.0, None, "mg", "oral", "once daily"),
    ("1.5 grams PO TID", 1.5, None, "g", "oral", "three times daily"),
    ("5000 international units IM monthly", 5000.0, None, "IU", "IM", "monthly"),
    ("10 mL every 12 hours", 10.0, None, "mL", "", "twice daily"),
    ("placebo", 0.0, None, "placebo", "", ""),
])
def test_single_dose(text, amount, high, unit, route, freq):
  (d,) = parse_doses(text)
  assert (d.amount, d.amount_high, d.unit, d.route, d.frequency) == (
      amount, high, unit, route, freq)


def test_several_doses_each_get_their_window():
  ds = parse_doses("ketoconazole 400mg po tid with hydrocortisone 20mg po every morning")
  assert [(d.amount, d.unit, d.route, d.frequency) for d in ds] == [
      (400.0, "mg", "oral", "three times daily"), (20.0, "mg", "oral", "")]


def test_unknown_unit_reported_not_parsed():
  r = BuildReport()
  assert parse_doses("5 mgs daily and 10 XYZ", r, "t", "rec") == ()
  assert r.n_skipped("t", "dose_unknown_unit") == 2
  assert parse_doses("for 3 years, 2 tablets", r, "t") == ()  # plain words are not units
  assert r.n_skipped("t", "dose_unknown_unit") == 2


def test_intervention_doses_prefers_arm_text():
  ds = intervention_doses("Dupilumab", "Administered via subcutaneous injection.",
                          "Dupilumab 300 mg qw", ("Dupilumab",))
  assert [(d.amount, d.unit, d.route, d.frequency) for d in ds] == [
      (300.0, "mg", "SC", "once weekly")]
  assert intervention_doses("Placebo", "", "Placebo 2mg", ("Placebo",))[0].unit == "placebo"


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.text(alphabet=st.sampled_from(list("0123456789 .,-/x^mgkLIUµ²±≤\u00a0abcdq")),
                          max_size=40) | st.text(max_size=40))
def test_never_crashes(text):
  for d in parse_doses(text, BuildReport()):
    assert d.amount is not None and d.amount >= 0 and d.unit


@pytest.mark.parametrize("text,freq", [
    ("once a week in phase A and once every 2 weeks in phase B", "once weekly"),
    ("once every 2 weeks", "every 2 weeks"), ("given once", "single dose"),
    ("once-weekly injection", "once weekly"),
])
def test_first_frequency_wins(text, freq):
  from data_pipeline.doses import find_frequency
  assert find_frequency(text) == freq
