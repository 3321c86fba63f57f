"""The API v2 bulk archive reader: a zip of the real study files gives exactly what the JSON
reader gives on the files themselves, read without unpacking; bad members are counted."""
import json
import zipfile

import pytest

from data_pipeline.build_report import BuildReport
from data_pipeline.readers import ctgov_bulk
from data_pipeline.readers.ctgov_json import read_ctgov_json


def _zip(path, members, compression=zipfile.ZIP_DEFLATED):
  with zipfile.ZipFile(path, "w", compression) as zf:
    for name, data in members:
      if name.endswith("/"):
        zf.mkdir(name)
      else:
        zf.writestr(name, data)
  return path


@pytest.fixture(scope="module")
def real_files(data_root):
  return sorted((data_root / "ctgov_json").glob("*.json"))


@pytest.fixture
def no_unpacking(monkeypatch):
  """Extracting a member fails the test (the test also checks no file appears on disk)."""
  def refuse(*a, **k):
    raise AssertionError("the reader unpacked the archive")
  monkeypatch.setattr(zipfile.ZipFile, "extract", refuse)
  monkeypatch.setattr(zipfile.ZipFile, "extractall", refuse)


def test_archive_reads_as_the_json_files_do(real_files, data_root, tmp_path, no_unpacking):
  archive = _zip(tmp_path / "ctg-studies.json.zip",
                 [("ctg-studies/", b"")] + [(f"ctg-studies/{p.name}", p.read_bytes())
                                            for p in real_files])
  before = sorted(tmp_path.rglob("*"))
  got, want = BuildReport(), BuildReport()
  trials = ctgov_bulk.read_ctgov_zip(tmp_path, got)  # a folder of archives, as the build passes
  assert trials == read_ctgov_json(data_root / "ctgov_json", want)
  assert [t.id for t in trials] == ["NCT00763412", "NCT02210780"]
  assert got.n_read(ctgov_bulk.SOURCE) == 2 == want.n_read("ctgov_json")
  assert got.to_dict()[ctgov_bulk.SOURCE]["skipped"] == {"no_results": {
      "count": 1, "examples": ["ctg-studies.json.zip:ctg-studies/NCT00973089.json"]}}
  assert sorted(tmp_path.rglob("*")) == before == [archive]


def test_bad_members_are_counted_by_reason_and_the_rest_read(real_files, tmp_path,
                                                             monkeypatch):
  good = real_files[0].read_bytes()
  monkeypatch.setattr(ctgov_bulk, "MAX_MEMBER_BYTES", len(good) + 10)
  archive = _zip(tmp_path / "a.zip", [
      ("NCT00763412.json", good),
      ("README.txt", b"not a study"),
      ("cut.json", good[:len(good) // 2]),
      ("list.json", b"[1, 2]"),
      ("no_id.json", json.dumps({"protocolSection": {}, "resultsSection": {}}).encode()),
      ("latin1.json", '{"a": "caf\xe9"}'.encode("latin-1")),
      ("big.json", b" " * (len(good) + 11)),
      ("crc.json", good),
  ], compression=zipfile.ZIP_STORED)
  raw = bytearray(archive.read_bytes())  # flip one byte inside the last member's data
  at = raw.rfind(good[1000:1040])
  raw[at] ^= 0xFF
  archive.write_bytes(bytes(raw))
  r = BuildReport()
  trials = ctgov_bulk.read_ctgov_zip(archive, r)
  assert [t.id for t in trials] == ["NCT00763412"] and r.n_read(ctgov_bulk.SOURCE) == 1
  assert dict(r.skipped[ctgov_bulk.SOURCE]) == {
      "not_json_member": 1, "bad_json": 2, "wrong_type": 1, "missing_field": 1,
      "member_too_large": 1, "unreadable_member": 1}
  assert r.to_dict()[ctgov_bulk.SOURCE]["skipped"]["unreadable_member"]["examples"] == [
      "a.zip:crc.json"]


def test_a_file_that_is_not_a_zip_is_counted(tmp_path):
  (tmp_path / "truncated.zip").write_bytes(b"PK\x03\x04 then nothing")
  r = BuildReport()
  assert ctgov_bulk.read_ctgov_zip([tmp_path / "truncated.zip", tmp_path / "absent.zip"], r) == []
  assert dict(r.skipped[ctgov_bulk.SOURCE]) == {"bad_zip": 1, "unreadable_file": 1}
