"""Broken inputs for every reader: counted per reason, never a crash, never half a Trial."""
import copy
import csv
import json
import os
import pathlib
import pickle
import tempfile

import hypothesis
import hypothesis.strategies as st

from data_pipeline import schema as S
from data_pipeline.build_report import BuildReport
from data_pipeline.readers import ct_open, ctgov_json, ctgov_xml
from data_pipeline.readers.evidence_inference import read_evidence_inference


def _study(nct="NCT00000001", values=("1.5", "2.5"), p="0.03", results=True):
  s = {"protocolSection": {
      "identificationModule": {"nctId": nct, "briefTitle": "T"},
      "designModule": {"phases": ["PHASE3"], "enrollmentInfo": {"count": 40}},
      "armsInterventionsModule": {
          "armGroups": [{"label": "Drug A", "type": "EXPERIMENTAL",
                         "description": "Drug A 10 mg oral once daily"},
                        {"label": "Placebo", "type": "PLACEBO_COMPARATOR"}],
          "interventions": [{"type": "DRUG", "name": "Drug A", "armGroupLabels": ["Drug A"]},
                            {"type": "DRUG", "name": "Placebo", "armGroupLabels": ["Placebo"]}]},
      "contactsLocationsModule": {"locations": [{"country": "France"}]}}}
  if results:
    s["resultsSection"] = {"outcomeMeasuresModule": {"outcomeMeasures": [{
        "type": "PRIMARY", "title": "Overall survival", "paramType": "MEAN",
        "groups": [{"id": "OG000", "title": "Drug A"}, {"id": "OG001", "title": "Placebo"}],
        "classes": [{"categories": [{"measurements": [
            {"groupId": "OG000", "value": values[0]}, {"groupId": "OG001", "value": values[1]}]}]}],
        "analyses": [{"groupIds": ["OG000", "OG001"], "pValue": p}]}]}}
  return s


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return path


def test_json_bad_files(tmp_path):
  good = json.dumps(_study())
  _write(tmp_path / "truncated.json", good[: len(good) // 2])
  _write(tmp_path / "list.json", "[1, 2]")
  _write(tmp_path / "noresults.json", json.dumps(_study("NCT2", results=False)))
  _write(tmp_path / "allna.json", json.dumps(_study("NCT3", values=("NA", "NR"))))
  bad_type = _study("NCT4")
  bad_type["protocolSection"]["armsInterventionsModule"]["armGroups"] = "oops"
  page = {"studies": [_study("NCT5", values=("<0.001", "2\u00a0")), bad_type,
                      _study("NCT6", values=("NA", "3"), p="NR"), 7]}
  _write(tmp_path / "page.json", json.dumps(page))
  r = BuildReport()
  trials = ctgov_json.read_ctgov_json(tmp_path, r)
  assert sorted(t.id for t in trials) == ["NCT5", "NCT6"]
  sk = r.skipped["ctgov_json"]
  assert sk["bad_json"] == 1 and sk["wrong_type"] == 3 and sk["no_results"] == 2
  assert sk["value_non_numeric"] == 1 and sk["p_value_non_numeric"] == 1
  t5 = next(t for t in trials if t.id == "NCT5")
  assert [(v.value, v.value_qualifier) for v in t5.outcomes[0].values] == [(0.001, "<"), (2.0, "=")]
  assert t5.outcomes[0].analyses[0].p_value == 0.03 and t5.countries == ("France",)
  t6 = next(t for t in trials if t.id == "NCT6")
  assert [v.arm_label for v in t6.outcomes[0].values] == ["Placebo"]
  assert t6.outcomes[0].analyses[0].p_value is None
  for t in trials:
    S.validate_trial(t)


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(st.data())
def test_json_mutations_never_crash(data):
  study = _study()
  # Replace one random node of the study with junk.
  paths, stack = [], [((), study)]
  while stack:
    p, node = stack.pop()
    items = node.items() if isinstance(node, dict) else enumerate(node) \
        if isinstance(node, list) else ()
    for k, v in items:
      paths.append(p + (k,))
      stack.append((p + (k,), v))
  path = data.draw(st.sampled_from(paths))
  junk = data.draw(st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=8),
                             st.lists(st.integers(), max_size=2),
                             st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
  mutated = copy.deepcopy(study)
  node = mutated
  for k in path[:-1]:
    node = node[k]
  node[path[-1]] = junk
  r = BuildReport()
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "study.json"
    path.write_text(json.dumps(mutated))
    trials = ctgov_json.read_ctgov_json(path, r)
  assert len(trials) + sum(r.skipped.get("ctgov_json", {}).get(k, 0) for k in (
      "wrong_type", "no_results", "missing_field", "invalid_record")) >= 1
  for t in trials:
    S.validate_trial(t)


_XML = """<clinical_study><id_info><nct_id>{nct}</nct_id></id_info>
<brief_title>X</brief_title><phase>Phase 2</phase><enrollment>{enroll}</enrollment>
<arm_group><arm_group_label>Drug A</arm_group_label><arm_group_type>Experimental</arm_group_type>
<description>Drug A 5 mg/kg IV every 3 weeks</description></arm_group>
<arm_group><arm_group_label>Control</arm_group_label><arm_group_type>No Intervention</arm_group_type></arm_group>
<intervention><intervention_type>Drug</intervention_type><intervention_name>Drug A</intervention_name>
<arm_group_label>Drug A</arm_group_label></intervention>
<eligibility><gender>Female</gender><minimum_age>6 Months</minimum_age></eligibility>
<location_countries><country>Côte d’Ivoire</country></location_countries>
{results}</clinical_study>"""
_RES = """<clinical_results><outcome_list><outcome><type>Primary</type><title>Mortality</title>
<group_list><group group_id="O1"><title>Drug A</title></group><group group_id="O2"><title>Control</title></group></group_list>
<measure><units>%</units><class_list><class><category_list><category><measurement_list>
<measurement group_id="O1" value="{v1}"/><measurement group_id="O2" value="{v2}"/>
</measurement_list></category></category_list></class></class_list></measure>
<analysis_list><analysis><group_id_list><group_id>O1</group_id><group_id>O2</group_id></group_id_list>
<p_value>{p}</p_value></analysis></analysis_list></outcome></outcome_list></clinical_results>"""


def _xml(nct, v1="1", v2="2", p="0.04", enroll="30", results=True):
  res = _RES.format(v1=v1, v2=v2, p=p.replace("<", "&lt;")) if results else ""
  return _XML.format(nct=nct, enroll=enroll, results=res)


def test_xml_bad_files(tmp_path):
  good = _xml("NCT1", v1="10.5", v2="NA", p="< .001")
  _write(tmp_path / "a.xml", good)
  _write(tmp_path / "b.xml", good[: len(good) // 2])
  _write(tmp_path / "c.xml", "<other_root/>")
  _write(tmp_path / "d.xml", _xml("NCT4", results=False))
  _write(tmp_path / "e.xml", _xml("NCT5", v1="NR", v2="NA"))
  _write(tmp_path / "f.xml", _xml("NCT6", v1="±1", v2="3", p="≤0.05", enroll="about 30"))
  _write(tmp_path / "g.xml", _xml("NCT7", p="NS"))
  r = BuildReport()
  trials = {t.id: t for t in ctgov_xml.read_ctgov_xml(tmp_path, r)}
  assert sorted(trials) == ["NCT1", "NCT6", "NCT7"]
  sk = r.skipped["ctgov_xml"]
  assert sk["bad_xml"] == 1 and sk["wrong_type"] == 1 and sk["no_results"] == 2
  assert sk["value_non_numeric"] == 2 and sk["p_value_non_numeric"] == 1
  t1 = trials["NCT1"]
  assert [(v.arm_id, v.value) for v in t1.outcomes[0].values] == [("O1", 10.5)]
  an = t1.outcomes[0].analyses[0]
  assert (an.p_value, an.p_qualifier, an.arm_ids) == (0.001, "<", ("O1", "O2"))
  assert t1.eligibility.sex == "FEMALE" and t1.eligibility.min_age_years == 0.5
  assert t1.countries == ("Côte d’Ivoire",) and t1.outcomes[0].polarity == "lower_better"
  (d,) = t1.arms[0].interventions[0].doses
  assert (d.amount, d.unit, d.route, d.frequency) == (5.0, "mg/kg", "IV", "every 3 weeks")
  t6 = trials["NCT6"]
  assert t6.enrollment is None and t6.outcomes[0].analyses[0].p_qualifier == "<="
  (tmp_path / "h.xml").write_bytes(b"\xff\xfe<")
  assert ctgov_xml.read_ctgov_xml([tmp_path / "h.xml"], BuildReport()) == []


def _entry(opts=("A wins.", "A does not win."), answer="A wins.", endpoint=None, meta="single_arm"):
  endpoint = endpoint if endpoint is not None else str(
      {"measure": "Survival", "description": "", "timeFrame": "1 year",
       "outcome_type": "primaryOutcomes"})
  return endpoint, {"brief_title": "T", "endpoint": endpoint, "meta_label": meta,
                    "arms": [{"label": "A", "type": "EXPERIMENTAL", "description": "A 5 mg"}],
                    "question_list_of_lists": [list(opts)], "answer_list_of_lists": [answer]}


def test_ct_open_bad_entries(tmp_path):
  entries = {}
  for nct, kw in [("NCT1", {}), ("NCT2", {"endpoint": "{'measure': __import__('os')}"}),
                  ("NCT3", {"answer": "nope"}), ("NCT4", {"opts": ("a", "b", "c", "d"),
                                                          "answer": "a"}),
                  ("NCT5", {"meta": "strange"})]:
    ep, v = _entry(**kw)
    entries[(nct, ep)] = v
  entries[("NCT6", "x")] = "not a dict"
  path = tmp_path / "mixed.pickle"
  path.write_bytes(pickle.dumps(entries))
  r = BuildReport()
  qs = ct_open.read_questions(path, r)
  assert [q.nct_id for q in qs] == ["NCT1"]
  sk = r.skipped["ct_open"]
  assert (sk["bad_endpoint"], sk["answer_not_in_options"], sk["bad_options"],
          sk["bad_meta_label"], sk["wrong_type"]) == (1, 1, 1, 1, 1)
  r2 = BuildReport()
  assert [t.id for t in ct_open.read_trials(path, r2)] == ["NCT1", "NCT3", "NCT4", "NCT5"]
  assert r2.skipped["ct_open_trials"] == {"bad_endpoint": 1, "bad_key": 1}


def test_ct_open_bad_files(tmp_path):
  (tmp_path / "list.pickle").write_bytes(pickle.dumps([1, 2]))
  (tmp_path / "evil.pickle").write_bytes(pickle.dumps(os.system))
  (tmp_path / "cut.pickle").write_bytes(pickle.dumps({"a": list(range(50))})[:15])
  r = BuildReport()
  for name in ("list", "evil", "cut", "missing"):
    assert ct_open.read_questions(tmp_path / f"{name}.pickle", r) == []
  assert r.skipped["ct_open"] == {"wrong_type": 1, "unsafe_pickle": 1, "bad_pickle": 2}


def test_evidence_inference_bad_rows(tmp_path):
  with open(tmp_path / "prompts_merged.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["PromptID", "PMCID", "Outcome", "Intervention", "Comparator"])
    w.writerow(["1", "100", "pain", "drug\u00a0A", "placebo"])
    w.writerow(["2", "100", "", "drug", "placebo"])     # missing outcome
    w.writerow(["3", "101", "death", "drug"])           # short row
    w.writerow(["4", "101", "death", "drug", "placebo"])  # tie
    w.writerow(["5", "102", "HbA1c", "drug", "placebo"])  # no annotation
  with open(tmp_path / "v2_annotations.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["UserID", "PromptID", "PMCID", "Valid Label", "Valid Reasoning", "Label",
                "Annotations", "Label Code", "In Abstract", "Evidence Start", "Evidence End"])
    for pid, label, valid, ev in [("1", "significantly decrease", "True", "pain fell"),
                                  ("1", "significantly decreased", "True", "p<0.01"),
                                  ("1", "no significant difference", "False", "x"),
                                  ("4", "significantly increased", "True", "a"),
                                  ("4", "no significant difference", "True", "b"),
                                  ("4", "maybe", "True", "c")]:
      w.writerow(["0", pid, "100", valid, "True", label, ev, "0", "UNK", "0", "1"])
  (tmp_path / "ev2_test_article_ids.txt").write_text("100\n")
  r = BuildReport()
  ex = read_evidence_inference(tmp_path, r)
  assert ex == [{"prompt_id": "1", "pmcid": "100", "intervention": "drug A",
                 "comparator": "placebo", "outcome": "pain", "label": "significantly decreased",
                 "evidence": "pain fell", "split": "test"}]
  assert r.skipped["evidence_inference"] == {
      "prompt_missing_field": 2, "label_tie": 1, "no_annotation": 1,
      "annotation_invalid": 1, "annotation_unknown_label": 1}
