"""BuildReport: counts merge, serialise and print."""
import json

from data_pipeline.build_report import BuildReport


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
