"""text: number/qualifier parsing, ages, dates, phases, arm types."""
import pytest

from data_pipeline import text


@pytest.mark.parametrize("raw,expected", [
    ("p<0.001", (0.001, "<")), ("< .001", (0.001, "<")), ("P = 0.03", (0.03, "=")),
    ("0.18", (0.18, "=")), ("≤0.05", (0.05, "<=")), (">= 0.99", (0.99, ">=")),
    ("<\u00a00.0001", (0.0001, "<")), ("p-value < 0.05", (0.05, "<")),
    ("NA", (None, "")), ("NR", (None, "")), ("", (None, "")), ("0.5 ± 0.1", (None, "")),
])
def test_parse_qualified(raw, expected):
  assert text.parse_qualified(raw) == expected


@pytest.mark.parametrize("raw,expected", [
    ("5,113", 5113.0), (" -3.5 ", -3.5), ("1e-3", 0.001), ("\u22122", -2.0),
    ("NA", None), ("<0.001", None), ("nan", None), ("inf", None), (None, None), ("1,2", None),
])
def test_parse_number(raw, expected):
  assert text.parse_number(raw) == expected


def test_ages_and_dates():
  assert text.parse_age_years("18 Years") == 18.0
  assert text.parse_age_years("6 Months") == 0.5
  assert text.parse_age_years("N/A") is None
  assert text.parse_age_years("1 Year") == 1.0
  assert text.normalise_date("September 1, 2006") == "2006-09-01"
  assert text.normalise_date("July 2020") == "2020-07"
  assert text.normalise_phase("Phase 1/Phase 2") == "PHASE1/PHASE2"
  assert text.normalise_phase("N/A") == "NA"
  assert text.normalise_arm_type("Placebo Comparator") == "PLACEBO_COMPARATOR"
  assert text.normalise_arm_type("weird") == "OTHER"


def test_design_fields_and_dates():
  assert [text.normalise_allocation(x) for x in ("Randomized", "Non-Randomized", "N/A",
                                                  "NON_RANDOMIZED", "", "weird")] == [
      "RANDOMIZED", "NON_RANDOMIZED", "NA", "NON_RANDOMIZED", "", ""]
  assert [text.normalise_masking(x) for x in ("None (Open Label)", "Double (Participant)",
                                               "QUADRUPLE", "", "blind")] == [
      "NONE", "DOUBLE", "QUADRUPLE", "", ""]
  assert text.iso_date("March 19, 2015") == "2015-03-19"
  assert text.iso_date("2020-05-07") == "2020-05-07"
  assert text.iso_date("July 2020") == "" and text.iso_date("") == ""
