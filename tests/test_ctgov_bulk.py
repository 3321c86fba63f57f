"""More trials (issue 11 item 5): the API v2 bulk archive reader (a zip of the real study
files gives exactly what the JSON reader gives on the files themselves, read without
unpacking; bad members counted); in the build, bulk zips beside the JSON files, the paper's
registry filter checked against the raw records, and CT Open's Train parts merged as one
release under the time rule."""
import io
import json
import pickle
import shutil
import urllib.error
import xml.etree.ElementTree as ET
import zipfile

import pytest

from configs import common
from data_pipeline import anchors, build, data_root as dr, safe_pickle
from data_pipeline.build_report import BuildReport
from data_pipeline.config import DataConfig
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


# --- in the build ---------------------------------------------------------------

XML_KEPT, XML_NOT_RANDOMISED, XML_SMALL, XML_NO_ALLOCATION = (
    "NCT00000143", "NCT00001277", "NCT00001596", "NCT00460798")


def _cfg(root, **kw):
  c = common.data().to_dict()  # the declared values: the paper's filter is on
  c.update(root=str(root), sources=("ctgov_xml", "ctgov_json"))
  c.update(kw)
  return DataConfig(**c)


def _xml_passes(path) -> bool:
  """The paper's filter read straight from the legacy XML (not through the reader)."""
  r = ET.parse(path).getroot()
  return (r.findtext("study_design_info/allocation") == "Randomized"
          and int(r.findtext("enrollment")) >= 50 and bool(r.findtext("results_first_posted")))


def _json_passes(study) -> bool:
  ps = study["protocolSection"]
  return (ps["designModule"]["designInfo"]["allocation"] == "RANDOMIZED"
          and ps["designModule"]["enrollmentInfo"]["count"] >= 50
          and "resultsFirstPostDateStruct" in ps["statusModule"])


def test_build_reads_bulk_zips_and_applies_the_registry_filter(real_files, data_root, tmp_path):
  (tmp_path / "ctgov_xml").mkdir()
  (tmp_path / "ctgov_json").mkdir()
  xml_ids = (XML_KEPT, XML_NOT_RANDOMISED, XML_SMALL, XML_NO_ALLOCATION)
  for i in xml_ids:
    shutil.copy(data_root / "ctgov_xml" / f"{i}.xml", tmp_path / "ctgov_xml")
  shutil.copy(real_files[-1], tmp_path / "ctgov_json")  # also in the zip: one duplicate
  _zip(tmp_path / "ctgov_json" / "ctg-studies.json.zip",
       [(p.name, p.read_bytes()) for p in real_files])
  assert tmp_path / "ctgov_json" / "ctg-studies.json.zip" in build.source_files(
      tmp_path, ("ctgov_json",))
  report = BuildReport()
  qs, trials, _ = build.read_sources(tmp_path, _cfg(tmp_path), report)
  studies = [json.loads(p.read_text()) for p in real_files if "resultsSection" in p.read_text()]
  want = ({i for i in xml_ids if _xml_passes(data_root / "ctgov_xml" / f"{i}.xml")}
          | {st["protocolSection"]["identificationModule"]["nctId"] for st in studies
             if _json_passes(st)})
  assert set(trials) == want == {XML_KEPT, "NCT02210780"}  # NCT00763412 enrolled 31
  assert {q.trial_id for q in qs} <= want and len({q.id for q in qs}) == len(qs)
  assert dict(report.skipped[build.TRIAL_FILTER]) == {
      "not_randomised": 1, "enrollment_below_min": 2, "allocation_unknown": 1,
      "duplicate_trial": 1}
  assert report.to_dict()[build.TRIAL_FILTER]["skipped"]["enrollment_below_min"][
      "examples"] == [XML_SMALL, "NCT00763412"]
  assert report.n_read(ctgov_bulk.SOURCE) == 2
  off = BuildReport()
  _, all_trials, _ = build.read_sources(tmp_path, _cfg(
      tmp_path, registry_randomised=False, registry_min_enrollment=0,
      registry_results_posted=False), off)
  assert set(all_trials) == set(xml_ids) | {"NCT00763412", "NCT02210780"}
  assert dict(off.skipped[build.TRIAL_FILTER]) == {"duplicate_trial": 1}
  with pytest.raises(ValueError, match="data.registry_min_enrollment"):
    _cfg(tmp_path, registry_min_enrollment=-1)


def _pickle(path, entries):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "wb") as f:
    pickle.dump(dict(entries), f, protocol=4)


@pytest.fixture(scope="module")
def ct_open_root(data_root, tmp_path_factory):
  """Small Winter / Summer files and three Train parts in the benchmark's format: Winter
  entries under new NCT ids (the Train split is disjoint from both), plus one entry on a
  Summer trial, which the build must drop."""
  root = tmp_path_factory.mktemp("ct_open_root")
  winter = list(safe_pickle.load(data_root / "ct_open" / "Winter_2025.pickle").items())
  summer = list(safe_pickle.load(data_root / "ct_open" / "Summer_2025.pickle").items())
  _pickle(root / "ct_open" / "Winter_2025.pickle", winter[:8])
  _pickle(root / "ct_open" / "Summer_2025.pickle", summer[:8])
  train = [((f"NCT990000{i:02d}", key[1]), value) for i, (key, value) in
           enumerate(winter[8:20])]
  for part, name in enumerate(dr.CT_OPEN_TRAIN_FILES):
    extra = [summer[0]] if part == 2 else []
    _pickle(root / "ct_open" / name, train[4 * part:4 * part + 4] + extra)
  return root, train, summer[0]


def test_train_parts_merge_as_one_release_and_an_eval_trial_is_dropped(ct_open_root):
  root, train, on_eval = ct_open_root
  report = BuildReport()
  qs, trials, _ = build.read_sources(root, _cfg(root, sources=("ct_open",)), report)
  got = [q for q in qs if q.split == "Train_2025"]
  n_train = sum(len(v["question_list_of_lists"]) for _, v in train)
  n_on_eval = len(on_eval[1]["question_list_of_lists"])
  assert len(got) == n_train + n_on_eval and len({q.id for q in got}) == len(got)
  assert all(q.id.startswith("ct_open:Train_2025:") for q in got)
  assert {k[0] for k, _ in train} <= set(trials)
  assert report.n_skipped("ct_open", "missing_file") == 0

  assert anchors.CT_OPEN_CUTOFFS["Train_2025"] == "2025-01-31"
  report = BuildReport()
  by_split, _, eval_ids = build.make_examples(_cfg(root, sources=("ct_open",)), root, report)
  assert report.n_skipped("splits", "ct_open_earlier_release_on_eval_trial") == n_on_eval
  everything = [ex for exs in by_split.values() for ex in exs]
  train_qs = [ex for ex in everything if ex.kind == "question" and ":Train_2025:" in ex.id]
  assert len(train_qs) == n_train and not any(":Train_2025:" in ex.id for ex in by_split["eval"]
                                              if ex.kind == "question")
  cross = [ex for ex in everything if ex.kind in ("approximate_pair", "chain")]
  from_train = [ex for ex in cross if ":Train_2025:" in ex.anchor.id]
  assert from_train  # Train questions anchor later targets ...
  for ex in from_train:
    assert ex.anchor.public_date == "2025-01-31" < ex.public_date
  for ex in cross:  # ... and nothing from Winter or later anchors a Train target
    if ":Train_2025:" in ex.id.split("->", 1)[1]:
      assert ex.anchor.public_date < "2025-01-31", ex.id


def test_missing_train_parts_are_counted(ct_open_root, tmp_path):
  root, _, _ = ct_open_root
  shutil.copytree(root / "ct_open", tmp_path / "ct_open",
                  ignore=shutil.ignore_patterns("Train_*"))
  report = BuildReport()
  build.read_sources(tmp_path, _cfg(tmp_path, sources=("ct_open",)), report)
  assert report.n_skipped("ct_open", "missing_file") == 3
  assert report.to_dict()["ct_open"]["skipped"]["missing_file"]["examples"] == [
      str(tmp_path / "ct_open" / n) for n in dr.CT_OPEN_TRAIN_FILES]


def test_download_fetches_train_parts_when_reachable(tmp_path, monkeypatch):
  reachable = set(dr.CT_OPEN_FILES) | {dr.CT_OPEN_TRAIN_FILES[0]}

  def urlopen(url, timeout):
    name = url.rsplit("/", 1)[1]
    if name not in reachable:
      raise urllib.error.URLError("unreachable")
    return io.BytesIO(name.encode())

  monkeypatch.setattr(dr.urllib.request, "urlopen", urlopen)
  dr.download_ct_open(tmp_path)
  got = sorted(p.name for p in (tmp_path / "ct_open").iterdir())
  assert got == sorted(reachable)  # no half-written .part left behind
  assert (tmp_path / "ct_open" / dr.CT_OPEN_TRAIN_FILES[0]).read_bytes() == (
      dr.CT_OPEN_TRAIN_FILES[0].encode())
  reachable.discard("Summer_2025.pickle")
  (tmp_path / "ct_open" / "Summer_2025.pickle").unlink()
  with pytest.raises(dr.DataRootError, match="Summer_2025.pickle"):
    dr.download_ct_open(tmp_path)
