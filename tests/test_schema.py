"""Schema helpers: number/qualifier parsing, ages, polarity, validation, BuildReport."""
import dataclasses
import json

import pytest

from data_pipeline import schema as S
from data_pipeline.build_report import BuildReport


@pytest.mark.parametrize("text,expected", [
    ("p<0.001", (0.001, "<")), ("< .001", (0.001, "<")), ("P = 0.03", (0.03, "=")),
    ("0.18", (0.18, "=")), ("≤0.05", (0.05, "<=")), (">= 0.99", (0.99, ">=")),
    ("<\u00a00.0001", (0.0001, "<")), ("p-value < 0.05", (0.05, "<")),
    ("NA", (None, "")), ("NR", (None, "")), ("", (None, "")), ("0.5 ± 0.1", (None, "")),
])
def test_parse_qualified(text, expected):
  assert S.parse_qualified(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("5,113", 5113.0), (" -3.5 ", -3.5), ("1e-3", 0.001), ("\u22122", -2.0),
    ("NA", None), ("<0.001", None), ("nan", None), ("inf", None), (None, None), ("1,2", None),
])
def test_parse_number(text, expected):
  assert S.parse_number(text) == expected


def test_ages_and_dates():
  assert S.parse_age_years("18 Years") == 18.0
  assert S.parse_age_years("6 Months") == 0.5
  assert S.parse_age_years("N/A") is None
  assert S.parse_age_years("1 Year") == 1.0
  assert S.normalise_date("September 1, 2006") == "2006-09-01"
  assert S.normalise_date("July 2020") == "2020-07"
  assert S.normalise_phase("Phase 1/Phase 2") == "PHASE1/PHASE2"
  assert S.normalise_phase("N/A") == "NA"
  assert S.normalise_arm_type("Placebo Comparator") == "PLACEBO_COMPARATOR"
  assert S.normalise_arm_type("weird") == "OTHER"


@pytest.mark.parametrize("title,expected", [
    ("Overall response rate", "higher_better"), ("Overall Survival", "higher_better"),
    ("Progression-free survival", "higher_better"), ("All-cause mortality", "lower_better"),
    ("Number of participants with adverse events", "lower_better"),
    ("Change in HbA1c", "lower_better"), ("Body mass index", "unknown"),
    ("Rate of relapse", "lower_better"),
    # real titles the first keyword rule got wrong
    ("Time to Objective Disease Progression", "higher_better"),
    ("Time to Disease Progression (TTP)", "higher_better"),
    ("Time to First Biochemical Failure (BF) (10-year Rates Reported)", "higher_better"),
    ("Time to Any Pain Relief (APR) by Treatment, <= 5 Minutes", "lower_better"),
    ("Time to Maximum Plasma Concentration (Tmax)", "unknown"),
    ("Clinically Significant Decrease in Quality of Life", "lower_better"),
    ("Clinically Significant (10-point) Decrease in UNISCALE Quality of Life (QOL)", "lower_better"),
    ("Number of Participants With Disease Progression or Death", "lower_better"),
    ("Progression Free-survival (PFS) [2 Years]", "higher_better"),
    ("Increase in pain score", "lower_better"), ("Improvement in pain score", "higher_better"),
    ("Reduction in HbA1c", "unknown"),  # a magnitude or a signed change: sign unknown
    ("Grades of Cardiotoxicity Events", "lower_better"),
])
def test_polarity(title, expected):
  assert S.infer_polarity(title) == expected


def test_polarity_title_before_description():
  # The descriptions name the failure modes that define the measure; the title decides.
  assert S.infer_polarity(
      "Percentage of participants with Best Overall Response",
      "BOR is the best response recorded until disease progression or death") == "higher_better"
  assert S.infer_polarity(
      "Time to Objective Disease Progression",
      "The time to objective disease progression in patients with metastatic cancer"
  ) == "higher_better"
  assert S.infer_polarity("Time to Tmax", "time to death") == "unknown"  # title decides
  # no cue in the title: the description is the fallback
  assert S.infer_polarity("First Occurrence of Major Cardiovascular Event",
                          "Time to first occurrence of nonfatal stroke or death") == "higher_better"
  assert S.infer_polarity("Percent change in body weight",
                          "the dose-response of increasing doses") == "unknown"


def _trial(**kw):
  t = S.Trial("NCT1", "test", "t", "PHASE2", (), (), 10, "", "", (), (), None)
  return dataclasses.replace(t, **kw)


def test_validate_rejects_bad_fields():
  S.validate_trial(_trial())
  with pytest.raises(S.SchemaError, match="NCT1.*conditions"):
    S.validate_trial(_trial(conditions=["a"]))
  bad_p = S.Analysis(("O1",), 1.5, "=", "", "", None, None, None, None, "")
  o = S.Outcome("x", "", "primary", "", "", "", (), (bad_p,), "unknown")
  with pytest.raises(S.SchemaError, match="p_value"):
    S.validate_trial(_trial(outcomes=(o,)))
  with pytest.raises(dataclasses.FrozenInstanceError):
    _trial().id = "x"


def test_match_arm_label():
  labels = ["1 Placebo", "2. repaglinide"]
  assert S.match_arm_label("2. Repaglinide", labels) == "2. repaglinide"
  assert S.match_arm_label("Arm: 1 placebo group", labels) == "1 Placebo"
  assert S.match_arm_label("Total", labels) == ""


def test_build_report_merge_and_format():
  a, b = BuildReport(), BuildReport()
  a.add_read("x", 2)
  a.add_skip("x", "no_results", "NCT1")
  b.add_skip("x", "no_results", "NCT2")
  b.add_skip("y", "bad_json", "f.json")
  a.merge(b)
  d = a.to_dict()
  json.dumps(d)
  assert d["x"] == {"read": 2, "skipped": {"no_results": {"count": 2,
                                                          "examples": ["NCT1", "NCT2"]}}}
  assert a.n_skipped("y", "bad_json") == 1 and a.n_skipped("x") == 2
  assert "no_results" in a.format() and "bad_json" in a.format()
