"""polarity: outcome titles (and descriptions) -> higher_better / lower_better / unknown."""
import pytest

from data_pipeline import polarity


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
  assert polarity.infer_polarity(title) == expected


def test_polarity_title_before_description():
  # The descriptions name the failure modes that define the measure; the title decides.
  assert polarity.infer_polarity(
      "Percentage of participants with Best Overall Response",
      "BOR is the best response recorded until disease progression or death") == "higher_better"
  assert polarity.infer_polarity(
      "Time to Objective Disease Progression",
      "The time to objective disease progression in patients with metastatic cancer"
  ) == "higher_better"
  assert polarity.infer_polarity("Time to Tmax", "time to death") == "unknown"  # title decides
  # no cue in the title: the description is the fallback
  assert polarity.infer_polarity("First Occurrence of Major Cardiovascular Event",
                          "Time to first occurrence of nonfatal stroke or death") == "higher_better"
  assert polarity.infer_polarity("Percent change in body weight",
                          "the dose-response of increasing doses") == "unknown"
