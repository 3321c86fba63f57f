"""CT Open benchmark pickles: questions (one example dict each) and protocol Trials.

Loaded only through data_pipeline.safe_pickle (plain built-in data). The `endpoint`
field is the repr of a dict and is parsed with ast.literal_eval, never eval.
Example ids are `ct_open:{split}:{nct_id}:{sha1(endpoint_str)[:10]}:{question_index}`
(split falls back to the file stem), so they are unique and deterministic.
"""
from __future__ import annotations

import ast
import hashlib
import os
import pathlib

from data_pipeline import safe_pickle
from data_pipeline import schema as S
from data_pipeline.build_report import BuildReport
from data_pipeline.doses import intervention_doses

SOURCE = "ct_open"
IMPLICIT = ("no_arm", "no_distinguishable_arm")
META_LABELS = ("single_arm", "distinguishable_arm", "no_arm", "no_distinguishable_arm")
_OUTCOME_TYPES = {"primaryOutcomes": "primary", "secondaryOutcomes": "secondary",
                  "otherOutcomes": "other"}


def load(path, report: BuildReport) -> dict:
  """The pickle's dict, or {} (counted) when it is unreadable or not a dict."""
  try:
    data = safe_pickle.load(path)
  except safe_pickle.UnsafePickleError:
    report.add_skip(SOURCE, "unsafe_pickle", os.fspath(path))
    return {}
  except (OSError, Exception) as e:  # noqa: BLE001 - any unreadable file is a counted skip
    report.add_skip(SOURCE, "bad_pickle", f"{os.fspath(path)}: {type(e).__name__}")
    return {}
  if not isinstance(data, dict):
    report.add_skip(SOURCE, "wrong_type", os.fspath(path))
    return {}
  return data


def parse_endpoint(text) -> dict:
  """'{'measure': ...}' -> dict; raises SkipRecord('bad_endpoint')."""
  try:
    d = ast.literal_eval(text) if isinstance(text, str) else None
  except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
    raise S.SkipRecord("bad_endpoint", str(e)[:80]) from e
  if not isinstance(d, dict) or not isinstance(d.get("measure"), str) or not d["measure"]:
    raise S.SkipRecord("bad_endpoint", "not a dict with a measure")
  return d


def _str(x) -> str:
  return S.clean_text(x) if isinstance(x, str) else ""


def _arm_dicts(value: dict) -> list[dict]:
  arms = value.get("arms")
  if not isinstance(arms, list) or not all(isinstance(a, dict) for a in arms):
    raise S.SkipRecord("bad_arms", "arms is not a list of objects")
  return arms


def arms_text(arms: list[dict]) -> str:
  """Compact text of arm labels, types, descriptions and interventions."""
  lines = []
  for a in arms:
    ivs = [iv for iv in (a.get("interventions") or []) if isinstance(iv, dict)]
    iv_txt = "; ".join(
        f"{_str(iv.get('type')).title()}: {_str(iv.get('name'))}"
        + (f" ({_str(iv.get('description'))})" if _str(iv.get("description")) else "")
        for iv in ivs)
    lines.append(f"- {_str(a.get('label'))} [{_str(a.get('type'))}]: "
                 f"{_str(a.get('description'))}" + (f" Interventions: {iv_txt}" if iv_txt else ""))
  return "\n".join(lines)


def parse_questions(key, value, split: str) -> list[dict]:
  """One pickle entry -> its question examples; raises SkipRecord for a bad entry."""
  if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key)):
    raise S.SkipRecord("bad_key", repr(key)[:80])
  if not isinstance(value, dict):
    raise S.SkipRecord("wrong_type", f"value is {type(value).__name__}")
  nct_id, endpoint_str = key
  endpoint = parse_endpoint(value.get("endpoint", endpoint_str))
  meta = value.get("meta_label")
  if meta not in META_LABELS:
    raise S.SkipRecord("bad_meta_label", repr(meta)[:40])
  qs, ans = value.get("question_list_of_lists"), value.get("answer_list_of_lists")
  if not isinstance(qs, list) or not isinstance(ans, list):
    raise S.SkipRecord("missing_field", "question_list_of_lists/answer_list_of_lists")
  if len(qs) != len(ans):
    raise S.SkipRecord("answer_count_mismatch", f"{len(qs)} questions, {len(ans)} answers")
  arms = _arm_dicts(value)
  text = arms_text(arms)
  h = hashlib.sha1(endpoint_str.encode("utf-8")).hexdigest()[:10]
  out = []
  for qi, (opts, answer) in enumerate(zip(qs, ans)):
    if (not isinstance(opts, list) or len(opts) not in (2, 3)
        or not all(isinstance(o, str) and o for o in opts)):
      raise S.SkipRecord("bad_options", f"question {qi}")
    if answer not in opts:
      raise S.SkipRecord("answer_not_in_options", f"question {qi}")
    out.append({
        "id": f"ct_open:{split}:{nct_id}:{h}:{qi}", "source": SOURCE, "kind": "question",
        "perturbation": "", "trial_id": nct_id, "anchor_trial_id": "",
        "options": list(opts), "label": opts.index(answer), "prompt": "", "completion": "",
        "split": split,
        "category": f"{len(opts)}-way/{'implicit' if meta in IMPLICIT else 'explicit'}",
        "nct_id": nct_id, "endpoint_str": endpoint_str, "question_index": qi,
        "title": _str(value.get("brief_title")), "endpoint": endpoint, "arms_text": text,
        "meta_label": meta,
    })
  return out


def read_questions(path, report: BuildReport, split: str = "") -> list[dict]:
  """All questions of one CT Open pickle, in file order; a bad entry skips its questions."""
  data = load(path, report)
  split = split or pathlib.Path(path).stem
  out = []
  for key, value in data.items():
    try:
      qs = parse_questions(key, value, split)
    except S.SkipRecord as e:
      report.add_skip(SOURCE, e.reason, repr(key)[:60])
      continue
    report.add_read(SOURCE, len(qs))
    out.extend(qs)
  return out


def _arm(a: dict, report, rid) -> S.Arm:
  label = _str(a.get("label"))
  if not label:
    raise S.SkipRecord("bad_arms", "arm without label")
  desc = _str(a.get("description"))
  ivs = [iv for iv in (a.get("interventions") or []) if isinstance(iv, dict)]
  names = tuple(_str(iv.get("name")) for iv in ivs)
  return S.Arm(label, label, S.normalise_arm_type(a.get("type")), desc, tuple(
      S.Intervention(_str(iv.get("name")), _str(iv.get("type")), _str(iv.get("description")),
                     intervention_doses(_str(iv.get("name")), _str(iv.get("description")),
                                        desc, names, report, SOURCE, rid))
      for iv in ivs))


def read_trials(path, report: BuildReport) -> list[S.Trial]:
  """One protocol-level Trial per NCT id: arms with doses, one value-less Outcome per endpoint.

  Counted in the report under source 'ct_open_trials' (questions use 'ct_open').
  """
  src = "ct_open_trials"
  sub = BuildReport()
  data = load(path, sub)
  for reason, n in sub.skipped.get(SOURCE, {}).items():
    for _ in range(n):
      report.add_skip(src, reason, os.fspath(path))
  by_id: dict[str, list] = {}
  for key, value in data.items():
    if (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str)
        and isinstance(value, dict)):
      by_id.setdefault(key[0], []).append(value)
    else:
      report.add_skip(src, "bad_key", repr(key)[:60])
  trials = []
  for nct_id, values in by_id.items():
    try:
      outcomes = []
      for v in values:
        e = parse_endpoint(v.get("endpoint"))
        title, desc = _str(e.get("measure")), _str(e.get("description"))
        outcomes.append(S.Outcome(
            title, desc, _OUTCOME_TYPES.get(e.get("outcome_type"), "other"),
            _str(e.get("timeFrame")), "", "", (), (), S.infer_polarity(title, desc)))
      arms = tuple(_arm(a, report, nct_id) for a in _arm_dicts(values[0]))
      trial = S.validate_trial(S.Trial(
          nct_id, SOURCE, _str(values[0].get("brief_title")), "", (), (), None, "", "",
          arms, tuple(outcomes), None))
    except S.SkipRecord as e:
      report.add_skip(src, e.reason, nct_id)
      continue
    except S.SchemaError:
      report.add_skip(src, "invalid_record", nct_id)
      continue
    report.add_read(src)
    trials.append(trial)
  return trials
