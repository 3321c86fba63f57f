"""Records in the wild (issue 14 item 4): real records of every reader's format, mutated
(truncation, wrong types, deep nesting, huge and non-finite numbers, integers over 4,300
digits, lone surrogates, entity expansion, 80 KB fields), go through the reader and the
build's read+render stage. Nothing may escape either, everything that falls out is
counted with a reason, and no record costs over a second of CPU.

Time is the process's CPU time (time.process_time), so other work on the machine does
not count; the bound is about 100 times what a record normally costs, and the quadratic
cases it guards against took 20 s and more.
"""
import contextlib
import csv
import datetime
import io as _stdio
import json
import pathlib
import pickle
import re
import shutil
import time
import xml.etree.ElementTree as ET
import zipfile

import hypothesis
import hypothesis.strategies as st
import pytest

from configs import common
from data_pipeline import build, io, safe_pickle
from data_pipeline.build_report import BuildReport
from data_pipeline.config import DataConfig
from data_pipeline.readers import ct_open, ctgov_bulk, ctgov_json, ctgov_xml
from data_pipeline.readers.evidence_inference import read_evidence_inference

SECONDS_PER_RECORD = 1.0
FUZZ = hypothesis.settings(
    max_examples=2, deadline=datetime.timedelta(seconds=20), derandomize=True,
    database=None, suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture,
                                          hypothesis.HealthCheck.too_slow])
HOLE = "__FUZZ_HOLE__"  # a node's placeholder in the serialised record, then raw junk
TITLE_80K = "time from baseline " * 4300  # 80 KB: quadratic for a backtracking regex
# Raw JSON text put where one value was.
JSON_JUNK = ("null", "true", "-7", "[]", "{}", '"NA"', '"<0.001"', "1e999", "-1e999", "NaN",
             "Infinity", "1" * 5000, "9" * 4000, '"\\ud800"', '"ok \\udfff"',
             json.dumps(TITLE_80K), json.dumps("x" * 80_000), "[" * 100 + "]" * 100,
             "[" * 5000 + "]" * 5000, '{"a":' * 5000 + "1" + "}" * 5000)
# Raw XML put as one element's text (or an attribute's value, quoted).
XML_JUNK = ("", "NA", "&lt;0.001", "1e999", "-inf", "nan", "1" * 5000, "&#xD800;", "&#0;",
            TITLE_80K, "x" * 80_000, "<b>" * 3000 + "</b>" * 3000, "&lol9;", "<unclosed>")
BILLION_LAUGHS = ('<?xml version="1.0"?>\n<!DOCTYPE clinical_study [\n<!ENTITY lol "lol">\n'
                  + "".join(f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";" if i > 1 else "&lol;") * 10}">\n'
                            for i in range(1, 10)) + "]>\n")
PY_JUNK = (None, -1, 10**5000, 2**1100, float("nan"), float("inf"), "\ud800", "ok \udfff",
           TITLE_80K, "x" * 80_000, [], {}, ("t",), b"raw", {"measure": 3})
CSV_JUNK = ("", "NA", "x" * 80_000, "x" * 200_000, "a\x00b", TITLE_80K, "1" * 5000, "\ud800",
            'half "quoted', "significantly increase")
REASON = re.compile(r"[a-z][a-z0-9_]*")


def _short(x) -> str:
  """A test id for a junk value."""
  r = f"int_{x.bit_length()}_bits" if isinstance(x, int) and x.bit_length() > 64 else repr(x)
  r = r if len(r) < 24 else f"{r[:12]}..{len(r)}"
  return re.sub(r"[^A-Za-z0-9_.<>-]", "_", r)


def _paths(node, prefix=()):
  """Every (path to a node) of a decoded JSON / pickle value, depth first."""
  out = []
  items = node.items() if isinstance(node, dict) else enumerate(node) \
      if isinstance(node, (list, tuple)) else ()
  for k, v in items:
    out.append(prefix + (k,))
    out.extend(_paths(v, prefix + (k,)))
  return out


def _replace(node, path, new):
  """A copy of `node` with the value at `path` replaced (tuples rebuilt)."""
  if not path:
    return new
  k, rest = path[0], path[1:]
  if isinstance(node, dict):
    return {**node, k: _replace(node[k], rest, new)}
  items = list(node)
  items[k] = _replace(items[k], rest, new)
  return type(node)(items)


@contextlib.contextmanager
def _cpu_bound(n_records: int, what: str):
  t0 = time.process_time()
  yield
  spent = time.process_time() - t0
  assert spent <= SECONDS_PER_RECORD * max(1, n_records), (
      f"{what}: {spent:.2f} s of CPU for {n_records} record(s)")


def _check_counted(report: BuildReport, sources, n_items: int):
  """Every skip names a reason; a reader that gave nothing counted why."""
  for src in sources:
    for reason in report.skipped.get(src, {}):
      assert REASON.fullmatch(reason), (src, reason)
  if n_items == 0:
    assert sum(report.n_skipped(s) for s in sources) >= 1, report.to_dict()


def _cfg(root: pathlib.Path, source: str) -> DataConfig:
  c = common.data().to_dict()
  c.update(root=str(root), sources=(source,), registry_randomised=False,
           registry_min_enrollment=0, registry_results_posted=False, anchors_k=1)
  return DataConfig(**c)


def _build_stage(root: pathlib.Path, source: str, n_records: int, tmp: pathlib.Path):
  """make_examples on `root` (read, pair, render, split), then the examples written as
  the build writes them: nothing escapes, and every string is valid UTF-8."""
  report = BuildReport()
  with _cpu_bound(n_records, f"build of {source}"):
    by_split, _, _ = build.make_examples(_cfg(root, source), root, report)
  io.write_jsonl(tmp / "examples.jsonl",
                 (ex.to_json() for exs in by_split.values() for ex in exs), sort_keys=True)
  for src, reasons in report.skipped.items():
    assert all(REASON.fullmatch(r) or src == "render" for r in reasons), (src, reasons)


def _fresh(tmp_path: pathlib.Path, name: str) -> pathlib.Path:
  d = tmp_path / name
  shutil.rmtree(d, ignore_errors=True)
  d.mkdir(parents=True)
  return d


# --- seeds: a few real records of each format, copied out of the data root -------

@pytest.fixture(scope="module")
def seeds(data_root):
  xml = sorted((data_root / "ctgov_xml").glob("*.xml"))[:3]
  js = sorted((data_root / "ctgov_json").glob("*.json"))[:3]
  assert xml and js, f"{data_root}: no registry records to fuzz"
  pickles = sorted((data_root / "ct_open").glob("*.pickle"))
  assert pickles, f"{data_root}: no CT Open-format pickle to fuzz"
  entries = list(safe_pickle.load(pickles[0]).items())[:2]
  ev = data_root / "evidence_inference"
  with open(ev / "v2_annotations.csv", newline="", encoding="utf-8") as f:
    ann = list(csv.reader(f))
  with open(ev / "prompts_merged.csv", newline="", encoding="utf-8") as f:
    prompts = list(csv.reader(f))
  pid = prompts[0].index("PromptID")
  annotated = {r[ann[0].index("PromptID")] for r in ann[1:]}
  keep = [r for r in prompts[1:] if r[pid] in annotated][:3]
  keep_ids = {r[pid] for r in keep}
  return {"xml": [p.read_bytes() for p in xml],
          "json": [json.loads(p.read_text(encoding="utf-8")) for p in js],
          "ct_open": entries,
          "csv": {"prompts_merged.csv": [prompts[0]] + keep,
                  "v2_annotations.csv": [ann[0]] + [r for r in ann[1:]
                                                    if r[ann[0].index("PromptID")] in keep_ids]}}


# --- API v2 JSON, as files and as bulk-archive members ---------------------------

@pytest.mark.parametrize("how", JSON_JUNK + ("truncate", "api_v1"), ids=_short)
@FUZZ
@hypothesis.given(data=st.data())
def test_json_and_bulk_mutations(seeds, tmp_path, how, data):
  """One value anywhere in a study replaced by `how`, or the text cut, or an API v1 page."""
  study = data.draw(st.sampled_from(seeds["json"]))
  if how not in ("truncate", "api_v1"):
    path = data.draw(st.sampled_from(_paths(study)))
    text = json.dumps(_replace(study, path, HOLE)).replace(json.dumps(HOLE), how, 1)
  elif how == "truncate":
    full = json.dumps(study)
    text = full[:data.draw(st.integers(0, len(full) - 1))]
  else:
    text = json.dumps({"FullStudiesResponse": {"FullStudies": [{"Study": study}]}})
  root = _fresh(tmp_path, "root")
  (root / "ctgov_json").mkdir()
  (root / "ctgov_json" / "study.json").write_text(text, encoding="utf-8")
  report = BuildReport()
  with _cpu_bound(1, "ctgov_json"):
    trials = ctgov_json.read_ctgov_json(root / "ctgov_json", report)
  _check_counted(report, [ctgov_json.SOURCE], len(trials))
  if how == "api_v1":
    assert report.n_skipped(ctgov_json.SOURCE, "api_v1_unsupported") == 1
  _build_stage(root, "ctgov_json", 1, tmp_path)

  bulk = _fresh(tmp_path, "bulk")
  with zipfile.ZipFile(bulk / "ctg-studies.json.zip", "w", zipfile.ZIP_DEFLATED) as zf:
    zf.writestr("NCT0.json", text)
  report = BuildReport()
  with _cpu_bound(1, "ctgov_bulk"):
    trials = ctgov_bulk.read_ctgov_zip(bulk, report)
  _check_counted(report, [ctgov_bulk.SOURCE], len(trials))


# --- legacy XML ----------------------------------------------------------------------

@pytest.mark.parametrize("junk", XML_JUNK + ("truncate", "laughs"), ids=_short)
@pytest.mark.parametrize("where", ("text", "attribute"))
@FUZZ
@hypothesis.given(data=st.data())
def test_xml_mutations(seeds, tmp_path, where, junk, data):
  """One element's text or attribute replaced by `junk`, or the file cut, or a record
  behind a billion-laughs DOCTYPE."""
  raw = data.draw(st.sampled_from(seeds["xml"]))
  how = junk if junk in ("truncate", "laughs") else where
  if how == "truncate":
    text = raw[:data.draw(st.integers(0, len(raw) - 1))]
  else:
    root_el = ET.fromstring(raw)
    elements = list(root_el.iter())
    if how == "attribute":
      elements = [e for e in elements if e.attrib] or elements
    el = data.draw(st.sampled_from(elements))
    if how == "attribute" and el.attrib:
      el.set(data.draw(st.sampled_from(sorted(el.attrib))), HOLE)
    else:
      el.text = HOLE
    junk = "&lol9;" if how == "laughs" else junk
    text = ET.tostring(root_el, encoding="unicode").replace(HOLE, junk, 1)
    text = ((BILLION_LAUGHS if how == "laughs" else "") + text).encode("utf-8", "surrogatepass")
  root = _fresh(tmp_path, "root")
  (root / "ctgov_xml").mkdir()
  (root / "ctgov_xml" / "NCT0.xml").write_bytes(text)
  report = BuildReport()
  with _cpu_bound(1, "ctgov_xml"):
    trials = ctgov_xml.read_ctgov_xml(root / "ctgov_xml", report)
  _check_counted(report, [ctgov_xml.SOURCE], len(trials))
  if how == "laughs":
    assert report.n_skipped(ctgov_xml.SOURCE, "xml_entity_declared") == 1
  _build_stage(root, "ctgov_xml", 1, tmp_path)


# --- CT Open pickles (through safe_pickle) ------------------------------------------

@pytest.mark.parametrize("junk", range(len(PY_JUNK)), ids=lambda j: _short(PY_JUNK[j]))
@pytest.mark.parametrize("how", ("value", "key", "truncate"))
@FUZZ
@hypothesis.given(data=st.data())
def test_ct_open_mutations(seeds, tmp_path, how, junk, data):
  """One value of an entry (or its key) replaced by PY_JUNK[junk], or the pickle cut."""
  entries = seeds["ct_open"]
  if how == "truncate" and junk:
    return  # one truncation case is enough
  i = data.draw(st.integers(0, len(entries) - 1))
  key, value = entries[i]
  if how == "value":
    value = _replace(value, data.draw(st.sampled_from(_paths(value))), PY_JUNK[junk])
  elif how == "key":
    junk_key = PY_JUNK[junk]
    key = junk_key if not isinstance(junk_key, (list, dict)) else (key[0], junk_key)[:1]
    key = data.draw(st.sampled_from([key, (key, entries[i][0][1]), (entries[i][0][0], key)]))
  mutated = dict(entries[:i] + [(key, value)] + entries[i + 1:])
  # protocol 0 writes ints as decimal text: 10**5000 cannot be written (test_safe_pickle
  # covers protocol 0)
  blob = pickle.dumps(mutated, protocol=data.draw(st.sampled_from((2, 4))))
  if how == "truncate":
    blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
  root = _fresh(tmp_path, "root")
  (root / "ct_open").mkdir()
  (root / "ct_open" / "Winter_2025.pickle").write_bytes(blob)
  report = BuildReport()
  with _cpu_bound(len(entries), "ct_open"):
    qs = ct_open.read_questions(root / "ct_open", report)
    trials = ct_open.read_trials(root / "ct_open", report)
  _check_counted(report, [ct_open.SOURCE], len(qs))
  _check_counted(report, [ct_open.TRIALS_SOURCE], len(trials))
  _build_stage(root, "ct_open", len(entries), tmp_path)


# --- Evidence Inference CSVs ----------------------------------------------------------

@pytest.mark.parametrize("how", CSV_JUNK + ("short_row", "truncate"), ids=_short)
@FUZZ
@hypothesis.given(data=st.data())
def test_evidence_inference_mutations(seeds, tmp_path, how, data):
  """One field of either table replaced by `how`, or a row (or the header) cut short, or
  the file cut."""
  tables = {name: [list(r) for r in rows] for name, rows in seeds["csv"].items()}
  name = data.draw(st.sampled_from(sorted(tables)))
  rows = tables[name]
  r = data.draw(st.integers(0 if how == "short_row" else 1, len(rows) - 1))
  if how not in ("short_row", "truncate"):
    rows[r][data.draw(st.integers(0, len(rows[r]) - 1))] = how
  elif how == "short_row":
    rows[r] = rows[r][:data.draw(st.integers(0, len(rows[r]) - 1))]
  root = _fresh(tmp_path, "root")
  ev = root / "evidence_inference"
  ev.mkdir()
  for fname, frows in tables.items():
    buf = _stdio.StringIO()
    csv.writer(buf).writerows(frows)
    blob = buf.getvalue().encode("utf-8", "surrogatepass")  # a lone surrogate: bad UTF-8
    if how == "truncate" and fname == name:
      blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    (ev / fname).write_bytes(blob)
  report = BuildReport()
  n = len(tables["prompts_merged.csv"]) + len(tables["v2_annotations.csv"])
  with _cpu_bound(n, "evidence_inference"):
    got = read_evidence_inference(ev, report)
  _check_counted(report, ["evidence_inference"], len(got))
  _build_stage(root, "evidence_inference", n, tmp_path)


# --- cases named by the issue, each once --------------------------------------------

def test_api_v1_is_named_and_logged(tmp_path, caplog):
  path = tmp_path / "v1.json"
  path.write_text(json.dumps({"FullStudiesResponse": {"NStudiesFound": 1, "FullStudies": []}}))
  report = BuildReport()
  assert ctgov_json.read_ctgov_json(path, report) == []
  assert dict(report.skipped[ctgov_json.SOURCE]) == {"api_v1_unsupported": 1}
  assert any("v1.json" in r.getMessage() and "FullStudiesResponse" in r.getMessage()
             for r in caplog.records)


def test_lone_surrogate_title_is_skipped_before_the_build_writes(tmp_path, seeds):
  study = _replace(seeds["json"][0], ("protocolSection", "identificationModule", "briefTitle"),
                   HOLE)
  path = tmp_path / "s.json"
  path.write_text(json.dumps(study).replace(json.dumps(HOLE), '"a \\ud800 b"'))
  report = BuildReport()
  assert ctgov_json.read_ctgov_json(path, report) == []
  assert report.n_skipped(ctgov_json.SOURCE, "lone_surrogate") == 1


def test_deep_and_huge_json_are_bad_json(tmp_path):
  for name, text in (("deep", "[" * 100_000 + "]" * 100_000), ("digits", "1" * 5000),
                     ("big", '{"a": ' + "7" * 4300 + "}")):
    (tmp_path / f"{name}.json").write_text(text)
  report = BuildReport()
  assert ctgov_json.read_ctgov_json(tmp_path, report) == []
  assert report.n_skipped(ctgov_json.SOURCE, "bad_json") == 2  # decoder: depth, digits
  assert report.n_skipped(ctgov_json.SOURCE, "number_out_of_range") == 1  # 4300 digits: no float


def test_80kb_outcome_titles_cost_linear_time(seeds, tmp_path):
  """An 80 KB outcome title in every format that carries one, through reader and build."""
  study = seeds["json"][0]
  om = next(p for p in _paths(study) if p[-2:-1] == ("outcomeMeasures",))
  js = _fresh(tmp_path, "json")
  (js / "ctgov_json").mkdir()
  (js / "ctgov_json" / "s.json").write_text(
      json.dumps(_replace(study, om + ("title",), TITLE_80K)))
  xml_root = ET.fromstring(seeds["xml"][0])
  xml_root.find("clinical_results/outcome_list/outcome/title").text = TITLE_80K
  xm = _fresh(tmp_path, "xml")
  (xm / "ctgov_xml").mkdir()
  (xm / "ctgov_xml" / "NCT0.xml").write_bytes(ET.tostring(xml_root))
  (key, value), = seeds["ct_open"][:1]
  endpoint = repr({"measure": TITLE_80K, "description": TITLE_80K, "timeFrame": "1 year"})
  co = _fresh(tmp_path, "ct_open")
  (co / "ct_open").mkdir()
  (co / "ct_open" / "Winter_2025.pickle").write_bytes(
      pickle.dumps({(key[0], endpoint): {**value, "endpoint": endpoint}}))
  for root, source in ((js, "ctgov_json"), (xm, "ctgov_xml"), (co, "ct_open")):
    _build_stage(root, source, 1, tmp_path)
