"""Legacy ClinicalTrials.gov AllPublicXML reader (`<clinical_study>` records).

Uses the standard library ElementTree: defusedxml is not installed here. Python's
expat does not fetch external entities, so the remaining risk is an entity
expansion bomb; these files come from the registry's own export, and a file that
fails to parse is counted as `bad_xml` and skipped.

Group ids follow ctgov_json: ArmValue.arm_id is the outcome's group id ("O1"),
arm_label the protocol arm label its title matches (else the group title) and
group_title the group's own title (dose groups of one arm share arm_label); Arm.id
is the participant-flow group id ("P1") whose title matches the arm, else the label.
A measure with several class/category rows becomes one Outcome per row, with the
analyses attached only when there is a single row.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET

from data_pipeline import schema as S
from data_pipeline.build_report import BuildReport
from data_pipeline.ctgov_json import expand_paths
from data_pipeline.doses import intervention_doses

SOURCE = "ctgov_xml"


def _t(e, path: str) -> str:
  return S.clean_text(e.findtext(path)) if e is not None else ""


def _arms(root, report, rid) -> tuple[S.Arm, ...]:
  arm_els = root.findall("arm_group")
  labels = [_t(a, "arm_group_label") for a in arm_els]
  flow = [(g.get("group_id", ""), _t(g, "title"))
          for g in root.findall("clinical_results/participant_flow/group_list/group")]
  ivs = [(_t(iv, "intervention_name"), _t(iv, "intervention_type"), _t(iv, "description"),
          [S.clean_text(x.text) for x in iv.findall("arm_group_label")])
         for iv in root.findall("intervention")]
  arms = []
  for a, label in zip(arm_els, labels):
    if not label:
      raise S.SkipRecord("missing_field", f"{rid}: arm_group without arm_group_label")
    desc = _t(a, "description")
    linked = [iv for iv in ivs if label in iv[3]]
    names = tuple(iv[0] for iv in linked)
    interventions = tuple(
        S.Intervention(n, typ, d, intervention_doses(n, d, desc, names, report, SOURCE, rid))
        for n, typ, d, _ in linked)
    fid = [g for g, t in flow if S.match_arm_label(t, labels) == label]
    arms.append(S.Arm(fid[0] if fid else label, label,
                      S.normalise_arm_type(_t(a, "arm_group_type")), desc, interventions))
  return tuple(arms)


def _analysis(a, report, where) -> S.Analysis:
  p, pq = None, ""
  raw = _t(a, "p_value")
  if raw:
    p, pq = S.parse_qualified(raw)
    if p is None or not 0.0 <= p <= 1.0:
      report.add_skip(SOURCE, "p_value_non_numeric", f"{where}:{raw!r}")
      p, pq = None, ""
  return S.Analysis(
      tuple(S.clean_text(g.text) for g in a.findall("group_id_list/group_id")), p, pq,
      _t(a, "method"), _t(a, "param_type"), S.parse_number(_t(a, "param_value")),
      S.parse_number(_t(a, "ci_lower_limit")), S.parse_number(_t(a, "ci_upper_limit")),
      S.parse_number(_t(a, "ci_percent")), _t(a, "non_inferiority_type"))


def _outcomes(root, arms, report, rid) -> tuple[S.Outcome, ...]:
  out = []
  for k, o in enumerate(root.findall("clinical_results/outcome_list/outcome")):
    where = f"{rid}:outcome{k}"
    title, desc = _t(o, "title"), _t(o, "description")
    if not title:
      report.add_skip(SOURCE, "outcome_missing_title", where)
      continue
    m = o.find("measure")
    if m is None:
      report.add_skip(SOURCE, "outcome_no_values", where)
      continue
    groups = o.findall("group_list/group")
    gid2label = {g.get("group_id", ""): (S.match_arm(_t(g, "title"), _t(g, "description"), arms)
                                         or _t(g, "title")) for g in groups}
    gid2title = {g.get("group_id", ""): _t(g, "title") for g in groups}
    gid2n = {}
    for c in m.findall("analyzed_list/analyzed[1]/count_list/count"):
      n = S.parse_number(c.get("value"))
      if n is not None:
        gid2n[c.get("group_id", "")] = int(n)
    rows = []
    for cl in m.findall("class_list/class"):
      for cat in cl.findall("category_list/category"):
        name = " / ".join(x for x in (_t(cl, "title"), _t(cat, "title")) if x)
        rows.append((name, cat.findall("measurement_list/measurement")))
    analyses = tuple(_analysis(a, report, where) for a in o.findall("analysis_list/analysis"))
    if analyses and len(rows) > 1:
      report.add_skip(SOURCE, "analysis_on_multirow_outcome", where)
    otype = _t(o, "type").lower()
    for name, ms in rows:
      values = []
      for me in ms:
        gid = me.get("group_id", "")
        v, q = S.parse_qualified(me.get("value"))
        if v is None:
          report.add_skip(SOURCE, "value_non_numeric", f"{where}:{gid}={me.get('value')!r}")
          continue
        values.append(S.ArmValue(
            gid, gid2label.get(gid, gid), v, q, _t(m, "dispersion"),
            S.parse_number(me.get("spread")), S.parse_number(me.get("lower_limit")),
            S.parse_number(me.get("upper_limit")), gid2n.get(gid), gid2title.get(gid, "")))
      if not values:
        report.add_skip(SOURCE, "outcome_no_values", where)
        continue
      out.append(S.Outcome(
          f"{title} [{name}]" if len(rows) > 1 and name else title, desc,
          otype if otype in ("primary", "secondary") else "other", _t(o, "time_frame"),
          _t(m, "units"), _t(m, "param"), tuple(values),
          analyses if len(rows) == 1 else (), S.infer_polarity(title, desc)))
  return tuple(out)


def parse_study(root, report: BuildReport) -> S.Trial:
  """One `<clinical_study>` element (or its XML text) -> Trial; raises SkipRecord."""
  if isinstance(root, (str, bytes)):
    try:
      root = ET.fromstring(root)
    except ET.ParseError as e:
      raise S.SkipRecord("bad_xml", str(e)) from e
  if root.tag != "clinical_study":
    raise S.SkipRecord("wrong_type", f"root element <{root.tag}>, not <clinical_study>")
  rid = _t(root, "id_info/nct_id")
  if not rid:
    raise S.SkipRecord("missing_field", "id_info/nct_id")
  if root.find("clinical_results") is None:
    raise S.SkipRecord("no_results", rid)
  arms = _arms(root, report, rid)
  outcomes = _outcomes(root, arms, report, rid)
  if not outcomes:
    raise S.SkipRecord("no_results", f"{rid}: no outcome with numeric values")
  enroll = S.parse_number(_t(root, "enrollment"))
  el = root.find("eligibility")
  trial = S.Trial(
      id=rid, source=SOURCE, title=_t(root, "brief_title") or _t(root, "official_title"),
      phase=S.normalise_phase(_t(root, "phase")),
      conditions=S.unique(c.text for c in root.findall("condition")),
      countries=S.unique(c.text for c in root.findall("location_countries/country")),
      enrollment=int(enroll) if enroll is not None and enroll >= 0 else None,
      start_date=S.normalise_date(_t(root, "start_date")),
      completion_date=S.normalise_date(_t(root, "completion_date")),
      arms=arms, outcomes=outcomes,
      eligibility=None if el is None else S.Eligibility(
          S.normalise_sex(_t(el, "gender")), S.parse_age_years(_t(el, "minimum_age")),
          S.parse_age_years(_t(el, "maximum_age")), _t(el, "criteria/textblock")))
  return S.validate_trial(trial)


def parse_text(text: str | bytes, report: BuildReport, where: str = "<xml>") -> S.Trial | None:
  """Parses one record's XML text; a bad record is counted under its reason -> None."""
  sub = BuildReport()  # value-level skips count only if the whole record is kept
  try:
    trial = parse_study(text, sub)
  except S.SkipRecord as e:
    report.add_skip(SOURCE, e.reason, where)
    return None
  except S.SchemaError:
    report.add_skip(SOURCE, "invalid_record", where)
    return None
  report.merge(sub)
  report.add_read(SOURCE)
  return trial


def read_ctgov_xml(path_or_paths, report: BuildReport) -> list[S.Trial]:
  """Reads .xml files (or folders of them); bad files are counted, never fatal."""
  trials = []
  for path in expand_paths(path_or_paths, ".xml"):
    try:
      data = path.read_bytes()
    except OSError:
      report.add_skip(SOURCE, "unreadable_file", str(path))
      continue
    t = parse_text(data, report, path.stem)
    if t is not None:
      trials.append(t)
  return trials
