"""data_pipeline.readers.loop: every file and record either read or counted by reason, never fatal."""
from data_pipeline.build_report import BuildReport
from data_pipeline.readers.loop import SkipRecord, read_files
from data_pipeline.schema import SchemaError


def _parse(raw, report):
  if raw == "skip":
    raise SkipRecord("odd_record")
  if raw == "invalid":
    raise SchemaError("x: bad")
  report.add_skip("src", "part_skipped", raw)  # counts only if the record is kept
  return [raw.upper()]


def _load(path):
  text = path.read_text()
  if text == "bad file":
    raise SkipRecord("bad_file", "detail")
  return text.split(",")


def test_read_files_counts_every_skip(tmp_path):
  (tmp_path / "a.txt").write_text("x,skip,y,invalid")
  (tmp_path / "b.txt").write_text("bad file")
  (tmp_path / "c.other").write_text("ignored")
  report = BuildReport()
  out = read_files([tmp_path, tmp_path / "missing.txt"], ".txt", "src", report, load=_load,
                   records=lambda items, path: [(f"{path.stem}:{i}", r) for i, r in
                                                enumerate(items)], parse=_parse)
  assert out == ["X", "Y"] and report.n_read("src") == 2
  assert report.skipped["src"] == {"odd_record": 1, "invalid_record": 1, "bad_file": 1,
                                   "unreadable_file": 1, "part_skipped": 2}
  assert report.examples[("src", "odd_record")] == ["a:1"]
  assert report.examples[("src", "bad_file")] == [f"{tmp_path / 'b.txt'}: detail"]
