"""ClinicalTrials.gov API v2 JSON reader (one study object or a {"studies": [...]} page).

A study without a `resultsSection` is skipped with reason `no_results`: the trials
are read to build result pairs, and a protocol-only record gives none. (CT Open
protocol text comes from ct_open.read_trials instead.)

Result groups ("OG000") are per outcome in the registry, so ArmValue.arm_id keeps
the outcome's group id and ArmValue.arm_label is the protocol arm label the group
title matches (else the group title); ArmValue.group_title is the group's own
title (dose groups of one arm share arm_label). Arm.id is the participant-flow group id
("FG000") whose title matches the arm, else the arm label. A measure with several
classes/categories becomes one Outcome per row ("title [class / category]"); its
analyses are attached only when the measure has a single row.

A document of the retired API v1 (top-level `FullStudiesResponse`) is skipped as
`api_v1_unsupported`, with a logged line naming the file: its fields differ throughout.
JSON nested too deep for the decoder, or holding an integer over Python's 4,300-digit
limit, is `bad_json`; the read loop's check_record refuses the rest (loop.py).
"""
from __future__ import annotations

import json
import logging
import pathlib

from data_pipeline import schema as S
from data_pipeline import text
from data_pipeline.build_report import BuildReport
from data_pipeline.readers import parts
from data_pipeline.readers.loop import SkipRecord, read_files

SOURCE = "ctgov_json"
API_V1_KEY = "FullStudiesResponse"
_OUTCOME_TYPES = {"PRIMARY": "primary", "SECONDARY": "secondary"}


def _str(x) -> str:
  return text.clean_text(x) if isinstance(x, (str, int, float)) else ""


def _dict(x, where: str) -> dict:
  if x is None:
    return {}
  if not isinstance(x, dict):
    raise SkipRecord("wrong_type", f"{where} is {type(x).__name__}, not an object")
  return x


def _list(x, where: str) -> list:
  if x is None:
    return []
  if not isinstance(x, list):
    raise SkipRecord("wrong_type", f"{where} is {type(x).__name__}, not a list")
  return x


def _arms(ps: dict, flow_groups: list, report, rid) -> tuple[S.Arm, ...]:
  aim = _dict(ps.get("armsInterventionsModule"), "armsInterventionsModule")
  ivs = [_dict(iv, "interventions[]") for iv in _list(aim.get("interventions"), "interventions")]
  flow = [(_str(g.get("id")), _str(g.get("title"))) for g in flow_groups if isinstance(g, dict)]
  groups = [_dict(ag, "armGroups[]") for ag in _list(aim.get("armGroups"), "armGroups")]
  labels = [_str(ag.get("label")) for ag in groups]
  arms = []
  for ag, label in zip(groups, labels):
    if not label:
      raise SkipRecord("missing_field", "arm group without label")
    linked = [(_str(iv.get("name")), _str(iv.get("type")), _str(iv.get("description")))
              for iv in ivs
              if label in [_str(x) for x in _list(iv.get("armGroupLabels"), "armGroupLabels")]]
    arms.append(parts.arm(label, ag.get("type"), _str(ag.get("description")), linked, report,
                          SOURCE, rid, flow, labels))
  return tuple(arms)


def _outcomes(om_list: list, arms, report, rid) -> tuple[S.Outcome, ...]:
  out = []
  for k, om in enumerate(om_list):
    om = _dict(om, "outcomeMeasures[]")
    where = f"{rid}:outcome{k}"
    title = _str(om.get("title"))
    if not title:
      report.add_skip(SOURCE, "outcome_missing_title", where)
      continue
    groups = [_dict(g, "groups[]") for g in _list(om.get("groups"), "groups")]
    labels, titles = parts.group_names(
        [(_str(g.get("id")), _str(g.get("title")), _str(g.get("description"))) for g in groups],
        arms)
    counts = {}
    for d in _list(om.get("denoms"), "denoms")[:1]:
      for c in _list(_dict(d, "denoms[]").get("counts"), "counts"):
        n = text.parse_number(_dict(c, "counts[]").get("value"))
        if n is not None:
          counts[_str(c.get("groupId"))] = int(n)
    analyses = tuple(
        parts.analysis(tuple(_str(g) for g in _list(a.get("groupIds"), "groupIds")),
                       a.get("pValue"), _str(a.get("statisticalMethod")),
                       _str(a.get("paramType")), a.get("paramValue"), a.get("ciLowerLimit"),
                       a.get("ciUpperLimit"), a.get("ciPctValue"),
                       _str(a.get("nonInferiorityType")), report, SOURCE, where)
        for a in [_dict(x, "analyses[]") for x in _list(om.get("analyses"), "analyses")])
    rows = []
    for cl in _list(om.get("classes"), "classes"):
      cl = _dict(cl, "classes[]")
      for cat in _list(cl.get("categories"), "categories"):
        cat = _dict(cat, "categories[]")
        name = " / ".join(x for x in (_str(cl.get("title")), _str(cat.get("title"))) if x)
        ms = [_dict(m, "measurements[]") for m in _list(cat.get("measurements"), "measurements")]
        values = (parts.arm_value(_str(m.get("groupId")), m.get("value"), labels, titles, counts,
                                  _str(om.get("dispersionType")), m.get("spread"),
                                  m.get("lowerLimit"), m.get("upperLimit"), report, SOURCE,
                                  where) for m in ms)
        rows.append((name, tuple(v for v in values if v is not None)))
    out.extend(parts.row_outcomes(
        title, _str(om.get("description")),
        _OUTCOME_TYPES.get(_str(om.get("type")).upper(), "other"), _str(om.get("timeFrame")),
        _str(om.get("unitOfMeasure")), _str(om.get("paramType")), rows, analyses, report,
        SOURCE, where))
  return tuple(out)


def parse_study(study, report: BuildReport) -> S.Trial:
  """One API v2 study object -> Trial; raises SkipRecord(reason) for a bad record."""
  if not isinstance(study, dict):
    raise SkipRecord("wrong_type", f"study is {type(study).__name__}, not an object")
  if API_V1_KEY in study:
    raise SkipRecord("api_v1_unsupported", API_V1_KEY)
  ps = _dict(study.get("protocolSection"), "protocolSection")
  ident = _dict(ps.get("identificationModule"), "identificationModule")
  rid = _str(ident.get("nctId"))
  if not rid:
    raise SkipRecord("missing_field", "identificationModule.nctId")
  rs = study.get("resultsSection")
  if not rs:
    raise SkipRecord("no_results", rid)
  rs = _dict(rs, "resultsSection")
  flow = _dict(rs.get("participantFlowModule"), "participantFlowModule").get("groups")
  arms = _arms(ps, _list(flow, "participantFlowModule.groups"), report, rid)
  oms = _dict(rs.get("outcomeMeasuresModule"), "outcomeMeasuresModule").get("outcomeMeasures")
  outcomes = _outcomes(_list(oms, "outcomeMeasures"), arms, report, rid)
  if not outcomes:
    raise SkipRecord("no_results", f"{rid}: no outcome with numeric values")
  status = _dict(ps.get("statusModule"), "statusModule")
  design = _dict(ps.get("designModule"), "designModule")
  elig = _dict(ps.get("eligibilityModule"), "eligibilityModule")
  info = _dict(design.get("designInfo"), "designInfo")
  enroll = text.parse_number(_dict(design.get("enrollmentInfo"), "enrollmentInfo").get("count"))
  locs = _list(_dict(ps.get("contactsLocationsModule"), "contactsLocationsModule")
               .get("locations"), "locations")
  trial = S.Trial(
      id=rid, source=SOURCE,
      title=_str(ident.get("briefTitle")) or _str(ident.get("officialTitle")),
      phase="/".join(_str(p) for p in _list(design.get("phases"), "phases")),
      conditions=text.unique(_list(_dict(ps.get("conditionsModule"), "conditionsModule")
                                   .get("conditions"), "conditions")),
      countries=text.unique(_dict(loc, "locations[]").get("country") for loc in locs),
      enrollment=int(enroll) if enroll is not None else None,
      start_date=_str(_dict(status.get("startDateStruct"), "startDateStruct").get("date")),
      completion_date=_str(_dict(status.get("completionDateStruct"),
                                 "completionDateStruct").get("date")),
      arms=arms, outcomes=outcomes,
      eligibility=S.Eligibility(text.normalise_sex(elig.get("sex")),
                                text.parse_age_years(elig.get("minimumAge")),
                                text.parse_age_years(elig.get("maximumAge")),
                                _str(elig.get("eligibilityCriteria"))) if elig else None,
      allocation=text.normalise_allocation(info.get("allocation")),
      masking=text.normalise_masking(
          _dict(info.get("maskingInfo"), "maskingInfo").get("masking")),
      results_posted=text.iso_date(_dict(status.get("resultsFirstPostDateStruct"),
                                         "resultsFirstPostDateStruct").get("date")))
  return S.validate_trial(trial)


def _parse(study, report: BuildReport) -> list[S.Trial]:
  return [parse_study(study, report)]


def _studies(doc, path: pathlib.Path):
  """(record id, study) of a decoded document: a page's studies, or the one study.
  A malformed document is passed on as one record, which parse_study rejects."""
  where = path.stem
  if isinstance(doc, dict) and API_V1_KEY in doc:
    logging.warning("%s: ClinicalTrials.gov API v1 (%s) is retired and not read; "
                    "download API v2 JSON", path, API_V1_KEY)
  if isinstance(doc, dict) and "studies" in doc:
    studies = doc["studies"]
    if not isinstance(studies, list):
      yield f"{where}:studies", None  # not a study: counted as wrong_type
      return
  else:
    studies = [doc]
  for i, st in enumerate(studies):
    rid = where if len(studies) == 1 else f"{where}[{i}]"
    try:
      nct = st.get("protocolSection", {}).get("identificationModule", {}).get("nctId")
      rid = nct if isinstance(nct, str) and nct else rid
    except AttributeError:
      pass
    yield rid, st


def decode(data: bytes) -> object:
  """The JSON document in `data`; raises SkipRecord('bad_json') for text that is not
  UTF-8 JSON, nests deeper than the decoder recurses, or holds an over-long integer."""
  try:
    return json.loads(data.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise SkipRecord("bad_json", "not UTF-8") from e
  except RecursionError as e:
    raise SkipRecord("bad_json", "nested too deep") from e
  except ValueError as e:  # JSONDecodeError, and ints over sys.get_int_max_str_digits()
    raise SkipRecord("bad_json", str(e)[:80]) from e


def _load(path: pathlib.Path):
  return decode(path.read_bytes())


def read_ctgov_json(path_or_paths, report: BuildReport) -> list[S.Trial]:
  """Reads .json files (or folders of them); unreadable files are counted, not fatal."""
  return read_files(path_or_paths, ".json", SOURCE, report, load=_load,
                    records=_studies, parse=_parse)
