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
"""
from __future__ import annotations

import json
import os
import pathlib

from data_pipeline import schema as S
from data_pipeline.build_report import BuildReport
from data_pipeline.doses import intervention_doses

SOURCE = "ctgov_json"
_OUTCOME_TYPES = {"PRIMARY": "primary", "SECONDARY": "secondary"}


def expand_paths(path_or_paths, suffix: str) -> list[pathlib.Path]:
  """Files named directly, and the `suffix` files of folders named, in sorted order."""
  items = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else path_or_paths
  out = []
  for p in map(pathlib.Path, items):
    out.extend(sorted(p.glob(f"*{suffix}")) if p.is_dir() else [p])
  return out


def _str(x) -> str:
  return S.clean_text(x) if isinstance(x, (str, int, float)) else ""


def _dict(x, where: str) -> dict:
  if x is None:
    return {}
  if not isinstance(x, dict):
    raise S.SkipRecord("wrong_type", f"{where} is {type(x).__name__}, not an object")
  return x


def _list(x, where: str) -> list:
  if x is None:
    return []
  if not isinstance(x, list):
    raise S.SkipRecord("wrong_type", f"{where} is {type(x).__name__}, not a list")
  return x


def _arms(ps: dict, flow_groups: list, report, rid) -> tuple[S.Arm, ...]:
  aim = _dict(ps.get("armsInterventionsModule"), "armsInterventionsModule")
  ivs = [_dict(iv, "interventions[]") for iv in _list(aim.get("interventions"), "interventions")]
  flow = [(_str(g.get("id")), _str(g.get("title"))) for g in flow_groups if isinstance(g, dict)]
  arms = []
  for ag in _list(aim.get("armGroups"), "armGroups"):
    ag = _dict(ag, "armGroups[]")
    label, desc = _str(ag.get("label")), _str(ag.get("description"))
    if not label:
      raise S.SkipRecord("missing_field", "arm group without label")
    linked = [iv for iv in ivs if label in [_str(x) for x in _list(iv.get("armGroupLabels"), "armGroupLabels")]]
    names = tuple(_str(iv.get("name")) for iv in linked)
    interventions = tuple(
        S.Intervention(_str(iv.get("name")), _str(iv.get("type")), _str(iv.get("description")),
                       intervention_doses(_str(iv.get("name")), _str(iv.get("description")),
                                          desc, names, report, SOURCE, rid))
        for iv in linked)
    fid = [i for i, t in flow if S.match_arm_label(t, [label]) and
           S.match_arm_label(t, [a.get("label", "") for a in aim.get("armGroups") if isinstance(a, dict)]) == label]
    arms.append(S.Arm(fid[0] if fid else label, label, S.normalise_arm_type(ag.get("type")),
                      desc, interventions))
  return tuple(arms)


def _measurement(m: dict, gid2label, gid2n, disp_type: str, report, where,
                 gid2title=None) -> S.ArmValue | None:
  gid = _str(m.get("groupId"))
  value, qual = S.parse_qualified(m.get("value"))
  if value is None:
    report.add_skip(SOURCE, "value_non_numeric", f"{where}:{gid}={m.get('value')!r}")
    return None
  lo, hi = S.parse_number(m.get("lowerLimit")), S.parse_number(m.get("upperLimit"))
  return S.ArmValue(gid, gid2label.get(gid, gid), value, qual, disp_type,
                    S.parse_number(m.get("spread")), lo, hi, gid2n.get(gid),
                    (gid2title or {}).get(gid, ""))


def _analysis(a: dict, report, where) -> S.Analysis:
  p, pq = None, ""
  if a.get("pValue") not in (None, ""):
    p, pq = S.parse_qualified(a.get("pValue"))
    if p is None or not 0.0 <= p <= 1.0:
      report.add_skip(SOURCE, "p_value_non_numeric", f"{where}:{a.get('pValue')!r}")
      p, pq = None, ""
  return S.Analysis(
      tuple(_str(g) for g in _list(a.get("groupIds"), "groupIds")), p, pq,
      _str(a.get("statisticalMethod")), _str(a.get("paramType")),
      S.parse_number(a.get("paramValue")), S.parse_number(a.get("ciLowerLimit")),
      S.parse_number(a.get("ciUpperLimit")), S.parse_number(a.get("ciPctValue")),
      _str(a.get("nonInferiorityType")))


def _outcomes(om_list: list, arms, report, rid) -> tuple[S.Outcome, ...]:
  out = []
  for k, om in enumerate(om_list):
    om = _dict(om, "outcomeMeasures[]")
    where = f"{rid}:outcome{k}"
    title = _str(om.get("title"))
    if not title:
      report.add_skip(SOURCE, "outcome_missing_title", where)
      continue
    desc = _str(om.get("description"))
    gid2label, gid2title = {}, {}
    for g in _list(om.get("groups"), "groups"):
      g = _dict(g, "groups[]")
      gid2title[_str(g.get("id"))] = _str(g.get("title"))
      gid2label[_str(g.get("id"))] = (
          S.match_arm(_str(g.get("title")), _str(g.get("description")), arms)
          or _str(g.get("title")))
    gid2n = {}
    for d in _list(om.get("denoms"), "denoms")[:1]:
      for c in _list(_dict(d, "denoms[]").get("counts"), "counts"):
        n = S.parse_number(_dict(c, "counts[]").get("value"))
        if n is not None:
          gid2n[_str(c.get("groupId"))] = int(n)
    rows = []
    for cl in _list(om.get("classes"), "classes"):
      cl = _dict(cl, "classes[]")
      for cat in _list(cl.get("categories"), "categories"):
        cat = _dict(cat, "categories[]")
        name = " / ".join(x for x in (_str(cl.get("title")), _str(cat.get("title"))) if x)
        rows.append((name, _list(cat.get("measurements"), "measurements")))
    analyses = tuple(_analysis(_dict(a, "analyses[]"), report, where)
                     for a in _list(om.get("analyses"), "analyses"))
    if analyses and len(rows) > 1:
      report.add_skip(SOURCE, "analysis_on_multirow_outcome", where)
    for name, ms in rows:
      values = tuple(v for v in (_measurement(_dict(m, "measurements[]"), gid2label, gid2n,
                                              _str(om.get("dispersionType")), report, where,
                                              gid2title)
                                 for m in ms) if v is not None)
      if not values:
        report.add_skip(SOURCE, "outcome_no_values", where)
        continue
      out.append(S.Outcome(
          f"{title} [{name}]" if len(rows) > 1 and name else title, desc,
          _OUTCOME_TYPES.get(_str(om.get("type")).upper(), "other"), _str(om.get("timeFrame")),
          _str(om.get("unitOfMeasure")), _str(om.get("paramType")), values,
          analyses if len(rows) == 1 else (), S.infer_polarity(title, desc)))
  return tuple(out)


def parse_study(study, report: BuildReport) -> S.Trial:
  """One API v2 study object -> Trial; raises SkipRecord(reason) for a bad record."""
  if not isinstance(study, dict):
    raise S.SkipRecord("wrong_type", f"study is {type(study).__name__}, not an object")
  ps = _dict(study.get("protocolSection"), "protocolSection")
  ident = _dict(ps.get("identificationModule"), "identificationModule")
  rid = _str(ident.get("nctId"))
  if not rid:
    raise S.SkipRecord("missing_field", "identificationModule.nctId")
  rs = study.get("resultsSection")
  if not rs:
    raise S.SkipRecord("no_results", rid)
  rs = _dict(rs, "resultsSection")
  flow = _dict(rs.get("participantFlowModule"), "participantFlowModule").get("groups")
  arms = _arms(ps, _list(flow, "participantFlowModule.groups"), report, rid)
  oms = _dict(rs.get("outcomeMeasuresModule"), "outcomeMeasuresModule").get("outcomeMeasures")
  outcomes = _outcomes(_list(oms, "outcomeMeasures"), arms, report, rid)
  if not outcomes:
    raise S.SkipRecord("no_results", f"{rid}: no outcome with numeric values")
  status = _dict(ps.get("statusModule"), "statusModule")
  design = _dict(ps.get("designModule"), "designModule")
  elig = _dict(ps.get("eligibilityModule"), "eligibilityModule")
  enroll = S.parse_number(_dict(design.get("enrollmentInfo"), "enrollmentInfo").get("count"))
  locs = _list(_dict(ps.get("contactsLocationsModule"), "contactsLocationsModule")
               .get("locations"), "locations")
  trial = S.Trial(
      id=rid, source=SOURCE,
      title=_str(ident.get("briefTitle")) or _str(ident.get("officialTitle")),
      phase="/".join(_str(p) for p in _list(design.get("phases"), "phases")),
      conditions=S.unique(_list(_dict(ps.get("conditionsModule"), "conditionsModule")
                                .get("conditions"), "conditions")),
      countries=S.unique(_dict(loc, "locations[]").get("country") for loc in locs),
      enrollment=int(enroll) if enroll is not None else None,
      start_date=_str(_dict(status.get("startDateStruct"), "startDateStruct").get("date")),
      completion_date=_str(_dict(status.get("completionDateStruct"),
                                 "completionDateStruct").get("date")),
      arms=arms, outcomes=outcomes,
      eligibility=S.Eligibility(S.normalise_sex(elig.get("sex")),
                                S.parse_age_years(elig.get("minimumAge")),
                                S.parse_age_years(elig.get("maximumAge")),
                                _str(elig.get("eligibilityCriteria"))) if elig else None)
  return S.validate_trial(trial)


def parse_document(doc, report: BuildReport, where: str = "<doc>") -> list[S.Trial]:
  """A decoded JSON document (study or page) -> trials; bad studies counted and skipped."""
  if isinstance(doc, dict) and "studies" in doc:
    studies = doc["studies"]
    if not isinstance(studies, list):
      report.add_skip(SOURCE, "wrong_type", f"{where}:studies")
      return []
  elif isinstance(doc, dict):
    studies = [doc]
  else:
    report.add_skip(SOURCE, "wrong_type", where)
    return []
  trials = []
  for i, st in enumerate(studies):
    rid = where if len(studies) == 1 else f"{where}[{i}]"
    try:
      nct = st.get("protocolSection", {}).get("identificationModule", {}).get("nctId")
      rid = nct if isinstance(nct, str) and nct else rid
    except AttributeError:
      pass
    # A partial work object is never returned: parse fully, then append.
    report_i = BuildReport()
    try:
      trial = parse_study(st, report_i)
    except S.SkipRecord as e:
      report.add_skip(SOURCE, e.reason, rid)
      continue
    except S.SchemaError:
      report.add_skip(SOURCE, "invalid_record", rid)
      continue
    report.merge(report_i)
    report.add_read(SOURCE)
    trials.append(trial)
  return trials


def read_ctgov_json(path_or_paths, report: BuildReport) -> list[S.Trial]:
  """Reads .json files (or folders of them); unreadable files are counted, not fatal."""
  trials = []
  for path in expand_paths(path_or_paths, ".json"):
    try:
      with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
      report.add_skip(SOURCE, "bad_json", str(path))
      continue
    except OSError:
      report.add_skip(SOURCE, "unreadable_file", str(path))
      continue
    trials.extend(parse_document(doc, report, path.stem))
  return trials
