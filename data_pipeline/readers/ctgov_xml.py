"""Legacy ClinicalTrials.gov AllPublicXML reader (`<clinical_study>` records).

Uses the standard library ElementTree: defusedxml is not installed here. Python's
expat does not fetch external entities, and the registry's records declare no
entities of their own, so a record with an `<!ENTITY` declaration (the entity
expansion bomb) is skipped as `xml_entity_declared` before it is parsed; a file that
fails to parse is counted as `bad_xml`.

Group ids follow ctgov_json: ArmValue.arm_id is the outcome's group id ("O1"),
arm_label the protocol arm label its title matches (else the group title) and
group_title the group's own title (dose groups of one arm share arm_label); Arm.id
is the participant-flow group id ("P1") whose title matches the arm, else the label.
A measure with several class/category rows becomes one Outcome per row, with the
analyses attached only when there is a single row.
"""
from __future__ import annotations

import pathlib
import xml.etree.ElementTree as ET

from data_pipeline import schema as S
from data_pipeline import text
from data_pipeline.build_report import BuildReport
from data_pipeline.readers import parts
from data_pipeline.readers.loop import SkipRecord, read_files

SOURCE = "ctgov_xml"


def _t(e, path: str) -> str:
  return text.clean_text(e.findtext(path)) if e is not None else ""


def _arms(root, report, rid) -> tuple[S.Arm, ...]:
  arm_els = root.findall("arm_group")
  labels = [_t(a, "arm_group_label") for a in arm_els]
  flow = [(g.get("group_id", ""), _t(g, "title"))
          for g in root.findall("clinical_results/participant_flow/group_list/group")]
  ivs = [(_t(iv, "intervention_name"), _t(iv, "intervention_type"), _t(iv, "description"),
          [text.clean_text(x.text) for x in iv.findall("arm_group_label")])
         for iv in root.findall("intervention")]
  arms = []
  for a, label in zip(arm_els, labels):
    if not label:
      raise SkipRecord("missing_field", f"{rid}: arm_group without arm_group_label")
    linked = [(n, typ, d) for n, typ, d, arm_labels in ivs if label in arm_labels]
    arms.append(parts.arm(label, _t(a, "arm_group_type"), _t(a, "description"), linked,
                          report, SOURCE, rid, flow, labels))
  return tuple(arms)


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
    labels, titles = parts.group_names(
        [(g.get("group_id", ""), _t(g, "title"), _t(g, "description"))
         for g in o.findall("group_list/group")], arms)
    counts = {}
    for c in m.findall("analyzed_list/analyzed[1]/count_list/count"):
      n = text.parse_number(c.get("value"))
      if n is not None:
        counts[c.get("group_id", "")] = int(n)
    analyses = tuple(
        parts.analysis(tuple(text.clean_text(g.text) for g in a.findall("group_id_list/group_id")),
                       _t(a, "p_value"), _t(a, "method"), _t(a, "param_type"),
                       _t(a, "param_value"), _t(a, "ci_lower_limit"), _t(a, "ci_upper_limit"),
                       _t(a, "ci_percent"), _t(a, "non_inferiority_type"), report, SOURCE, where)
        for a in o.findall("analysis_list/analysis"))
    rows = []
    for cl in m.findall("class_list/class"):
      for cat in cl.findall("category_list/category"):
        name = " / ".join(x for x in (_t(cl, "title"), _t(cat, "title")) if x)
        values = (parts.arm_value(me.get("group_id", ""), me.get("value"), labels, titles,
                                  counts, _t(m, "dispersion"), me.get("spread"),
                                  me.get("lower_limit"), me.get("upper_limit"), report, SOURCE,
                                  where)
                  for me in cat.findall("measurement_list/measurement"))
        rows.append((name, tuple(v for v in values if v is not None)))
    otype = _t(o, "type").lower()
    out.extend(parts.row_outcomes(
        title, desc, otype if otype in ("primary", "secondary") else "other",
        _t(o, "time_frame"), _t(m, "units"), _t(m, "param"), rows, analyses, report, SOURCE,
        where))
  return tuple(out)


def parse_study(root, report: BuildReport) -> S.Trial:
  """One `<clinical_study>` element (or its XML text) -> Trial; raises SkipRecord."""
  if isinstance(root, (str, bytes)):
    if (b"<!ENTITY" if isinstance(root, bytes) else "<!ENTITY") in root:
      raise SkipRecord("xml_entity_declared")
    try:
      root = ET.fromstring(root)
    except ET.ParseError as e:
      raise SkipRecord("bad_xml", str(e)) from e
  if root.tag != "clinical_study":
    raise SkipRecord("wrong_type", f"root element <{root.tag}>, not <clinical_study>")
  rid = _t(root, "id_info/nct_id")
  if not rid:
    raise SkipRecord("missing_field", "id_info/nct_id")
  if root.find("clinical_results") is None:
    raise SkipRecord("no_results", rid)
  arms = _arms(root, report, rid)
  outcomes = _outcomes(root, arms, report, rid)
  if not outcomes:
    raise SkipRecord("no_results", f"{rid}: no outcome with numeric values")
  enroll = text.parse_number(_t(root, "enrollment"))
  el = root.find("eligibility")
  trial = S.Trial(
      id=rid, source=SOURCE, title=_t(root, "brief_title") or _t(root, "official_title"),
      phase=text.normalise_phase(_t(root, "phase")),
      conditions=text.unique(c.text for c in root.findall("condition")),
      countries=text.unique(c.text for c in root.findall("location_countries/country")),
      enrollment=int(enroll) if enroll is not None and enroll >= 0 else None,
      start_date=text.normalise_date(_t(root, "start_date")),
      completion_date=text.normalise_date(_t(root, "completion_date")),
      arms=arms, outcomes=outcomes,
      eligibility=None if el is None else S.Eligibility(
          text.normalise_sex(_t(el, "gender")), text.parse_age_years(_t(el, "minimum_age")),
          text.parse_age_years(_t(el, "maximum_age")), _t(el, "criteria/textblock")),
      allocation=text.normalise_allocation(_t(root, "study_design_info/allocation")),
      masking=text.normalise_masking(_t(root, "study_design_info/masking")),
      results_posted=text.iso_date(_t(root, "results_first_posted")))
  return S.validate_trial(trial)


def _parse(data, report: BuildReport) -> list[S.Trial]:
  return [parse_study(data, report)]


def read_ctgov_xml(path_or_paths, report: BuildReport) -> list[S.Trial]:
  """Reads .xml files (or folders of them); bad files are counted, never fatal."""
  return read_files(path_or_paths, ".xml", SOURCE, report, load=pathlib.Path.read_bytes,
                    records=lambda data, path: [(path.stem, data)], parse=_parse)
