"""arms: result-group titles matched to protocol arm labels."""
from data_pipeline import arms


def test_match_arm_label():
  labels = ["1 Placebo", "2. repaglinide"]
  assert arms.match_arm_label("2. Repaglinide", labels) == "2. repaglinide"
  assert arms.match_arm_label("Arm: 1 placebo group", labels) == "1 Placebo"
  assert arms.match_arm_label("Total", labels) == ""
