"""Trial parts built the same way by every reader: arms with doses, arm values,
analyses and outcomes from already-extracted raw fields.

The registries' JSON and XML name their fields differently but mean the same
things; the readers pull the raw strings out and these functions parse them, so
the rules (what counts as a p-value, how a multi-row measure splits) are one copy.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from data_pipeline.arms import match_arm, match_arm_label
from data_pipeline.build_report import BuildReport
from data_pipeline.doses import intervention_doses
from data_pipeline.polarity import infer_polarity
from data_pipeline.schema import Analysis, Arm, ArmValue, Intervention, Outcome
from data_pipeline.text import normalise_arm_type, parse_number, parse_qualified


def arm(label: str, arm_type, description: str, linked: Sequence[tuple[str, str, str]],
        report: BuildReport, source: str, rid: str,
        flow: Sequence[tuple[str, str]] = (), labels: Sequence[str] = ()) -> Arm:
  """An Arm with its interventions (name, type, description) and their doses.

  Arm.id is the participant-flow group id whose title matches this arm among all
  the trial's arm `labels`, else the label.
  """
  names = tuple(n for n, _, _ in linked)
  ivs = tuple(Intervention(n, t, d, intervention_doses(n, d, description, names, report,
                                                       source, rid))
              for n, t, d in linked)
  flow_ids = [gid for gid, title in flow if match_arm_label(title, labels) == label]
  return Arm(flow_ids[0] if flow_ids else label, label, normalise_arm_type(arm_type),
             description, ivs)


def group_names(groups: Sequence[tuple[str, str, str]], arms: Sequence[Arm]
                ) -> tuple[dict[str, str], dict[str, str]]:
  """Result groups (id, title, description) -> ({id: protocol arm label, else the title},
  {id: the group's own title})."""
  labels = {gid: match_arm(title, desc, arms) or title for gid, title, desc in groups}
  return labels, {gid: title for gid, title, _ in groups}


def arm_value(gid: str, raw_value, labels: Mapping[str, str], titles: Mapping[str, str],
              counts: Mapping[str, int], dispersion_type: str, spread, lower, upper,
              report: BuildReport, source: str, where: str) -> ArmValue | None:
  """One measurement; a non-numeric value is counted (value_non_numeric) -> None."""
  value, qualifier = parse_qualified(raw_value)
  if value is None:
    report.add_skip(source, "value_non_numeric", f"{where}:{gid}={raw_value!r}")
    return None
  return ArmValue(gid, labels.get(gid, gid), value, qualifier, dispersion_type,
                  parse_number(spread), parse_number(lower), parse_number(upper),
                  counts.get(gid), titles.get(gid, ""))


def analysis(arm_ids: tuple[str, ...], raw_p, method: str, param_type: str, estimate,
             ci_low, ci_high, ci_pct, non_inferiority: str, report: BuildReport, source: str,
             where: str) -> Analysis:
  """A statistical analysis; a p-value that is not a number in [0, 1] is counted
  (p_value_non_numeric) and left out."""
  p, qualifier = None, ""
  if raw_p not in (None, ""):
    p, qualifier = parse_qualified(raw_p)
    if p is None or not 0.0 <= p <= 1.0:
      report.add_skip(source, "p_value_non_numeric", f"{where}:{raw_p!r}")
      p, qualifier = None, ""
  return Analysis(arm_ids, p, qualifier, method, param_type, parse_number(estimate),
                  parse_number(ci_low), parse_number(ci_high), parse_number(ci_pct),
                  non_inferiority)


def row_outcomes(title: str, description: str, outcome_type: str, time_frame: str, unit: str,
                 param_type: str, rows: Sequence[tuple[str, tuple[ArmValue, ...]]],
                 analyses: tuple[Analysis, ...], report: BuildReport, source: str,
                 where: str) -> list[Outcome]:
  """One Outcome per class/category row ("title [row]" when there are several rows);
  the analyses are attached only to a single-row measure, whose rows they describe."""
  if analyses and len(rows) > 1:
    report.add_skip(source, "analysis_on_multirow_outcome", where)
  out = []
  for name, values in rows:
    if not values:
      report.add_skip(source, "outcome_no_values", where)
      continue
    out.append(Outcome(
        f"{title} [{name}]" if len(rows) > 1 and name else title, description, outcome_type,
        time_frame, unit, param_type, values, analyses if len(rows) == 1 else (),
        infer_polarity(title, description)))
  return out
