"""CT Open benchmark pickles: questions (one Example each) and protocol Trials.

Loaded only through data_pipeline.safe_pickle (plain built-in data). The `endpoint`
field is the repr of a dict and is parsed with ast.literal_eval, never eval; the
Example carries it as one line of text (`endpoint_line`) and its measure as
`outcome_title`, and the arms as one line each (`arm_line`).
Example ids are `ct_open:{split}:{nct_id}:{sha1(endpoint_str)[:10]}:{question_index}`
(split falls back to the file stem), so they are unique and deterministic.
"""
from __future__ import annotations

import ast
import collections
import hashlib
import pathlib

from data_pipeline import safe_pickle
from data_pipeline import schema as S
from data_pipeline.build_report import BuildReport
from data_pipeline.example import Example
from data_pipeline.polarity import infer_polarity
from data_pipeline.readers import parts
from data_pipeline.readers.loop import SkipRecord, read_files
from data_pipeline.text import clean_text

SOURCE = "ct_open"
TRIALS_SOURCE = "ct_open_trials"  # read_trials' counts (questions count under SOURCE)
IMPLICIT = ("no_arm", "no_distinguishable_arm")
META_LABELS = ("single_arm", "distinguishable_arm", "no_arm", "no_distinguishable_arm")
_OUTCOME_TYPES = {"primaryOutcomes": "primary", "secondaryOutcomes": "secondary",
                  "otherOutcomes": "other"}


def load(path) -> dict:
  """The pickle's dict; raises SkipRecord (unsafe_pickle / bad_pickle / wrong_type)."""
  try:
    data = safe_pickle.load(path)
  except safe_pickle.UnsafePickleError as e:
    raise SkipRecord("unsafe_pickle") from e
  except Exception as e:  # noqa: BLE001 - any unreadable file is a counted skip
    raise SkipRecord("bad_pickle", type(e).__name__) from e
  if not isinstance(data, dict):
    raise SkipRecord("wrong_type")
  return data


def parse_endpoint(endpoint) -> dict:
  """'{'measure': ...}' -> dict; raises SkipRecord('bad_endpoint')."""
  try:
    d = ast.literal_eval(endpoint) if isinstance(endpoint, str) else None
  except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
    raise SkipRecord("bad_endpoint", str(e)[:80]) from e
  if not isinstance(d, dict) or not isinstance(d.get("measure"), str) or not d["measure"]:
    raise SkipRecord("bad_endpoint", "not a dict with a measure")
  return d


def endpoint_line(endpoint: dict) -> str:
  """The endpoint dict as the line a prompt shows: measure, time frame, description."""
  tf = f" Time frame: {endpoint['timeFrame']}." if endpoint.get("timeFrame") else ""
  desc = f" {endpoint['description']}" if endpoint.get("description") else ""
  return f"{endpoint.get('measure', '')}.{tf}{desc}"


def _str(x) -> str:
  return clean_text(x) if isinstance(x, str) else ""


def _key_id(key) -> str:
  """A short id for the report: the NCT id and endpoint of a well-formed key, else the
  key's type (repr of a malformed key can be huge: items shared through the memo)."""
  if isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key):
    return f"{key[0][:20]}:{key[1][:40]}"
  return f"<{type(key).__name__} key>"


def _arm_dicts(value: dict) -> list[dict]:
  arms = value.get("arms")
  if not isinstance(arms, list) or not all(isinstance(a, dict) for a in arms):
    raise SkipRecord("bad_arms", "arms is not a list of objects")
  return arms


def _interventions(arm: dict) -> list[tuple[str, str, str]]:
  return [(_str(iv.get("name")), _str(iv.get("type")), _str(iv.get("description")))
          for iv in (arm.get("interventions") or []) if isinstance(iv, dict)]


def arm_line(arm: dict) -> str:
  """One arm as text: label, type, description and interventions."""
  ivs = "; ".join(f"{typ.title()}: {name}" + (f" ({desc})" if desc else "")
                  for name, typ, desc in _interventions(arm))
  line = (f"{_str(arm.get('label'))} [{_str(arm.get('type'))}]: {_str(arm.get('description'))}"
          + (f" Interventions: {ivs}" if ivs else ""))
  return line.strip().lstrip("- ")


def parse_questions(key, value, split: str) -> list[Example]:
  """One pickle entry -> its question Examples; raises SkipRecord for a bad entry."""
  if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key)):
    raise SkipRecord("bad_key", _key_id(key))
  if not isinstance(value, dict):
    raise SkipRecord("wrong_type", f"value is {type(value).__name__}")
  nct_id, endpoint_str = key
  endpoint = parse_endpoint(value.get("endpoint", endpoint_str))
  meta = value.get("meta_label")
  if meta not in META_LABELS:
    raise SkipRecord("bad_meta_label", repr(meta)[:40])
  qs, ans = value.get("question_list_of_lists"), value.get("answer_list_of_lists")
  if not isinstance(qs, list) or not isinstance(ans, list):
    raise SkipRecord("missing_field", "question_list_of_lists/answer_list_of_lists")
  if len(qs) != len(ans):
    raise SkipRecord("answer_count_mismatch", f"{len(qs)} questions, {len(ans)} answers")
  arms = tuple(arm_line(a) for a in _arm_dicts(value))
  h = hashlib.sha1(endpoint_str.encode("utf-8")).hexdigest()[:10]
  out = []
  for qi, (opts, answer) in enumerate(zip(qs, ans)):
    if (not isinstance(opts, list) or len(opts) not in (2, 3)
        or not all(isinstance(o, str) and o for o in opts)):
      raise SkipRecord("bad_options", f"question {qi}")
    if answer not in opts:
      raise SkipRecord("answer_not_in_options", f"question {qi}")
    out.append(Example(
        id=f"ct_open:{split}:{nct_id}:{h}:{qi}", source=SOURCE, kind="question",
        trial_id=nct_id, options=tuple(opts), label=opts.index(answer), split=split,
        category=f"{len(opts)}-way/{'implicit' if meta in IMPLICIT else 'explicit'}",
        nct_id=nct_id, endpoint_str=endpoint_str, question_index=qi, meta_label=meta,
        title=_str(value.get("brief_title")), endpoint=endpoint_line(endpoint), arms=arms,
        outcome_title=endpoint["measure"]))
  return out


def read_questions(path, report: BuildReport, split: str = "") -> list[Example]:
  """All questions of CT Open pickles (a file, or a folder of them), in file order;
  a bad entry skips its questions. `split` defaults to each file's stem."""
  def entries(data: dict, path_: pathlib.Path):
    return ((_key_id(key), (key, value, split or path_.stem)) for key, value in data.items())

  return read_files(path, ".pickle", SOURCE, report, load=load, records=entries,
                    parse=lambda entry, _: parse_questions(*entry))


def _by_trial(data: dict, path: pathlib.Path):
  """(NCT id, (NCT id, [entry values])) per trial; an entry with a bad key is passed
  on as (key, None), which _parse_trial rejects (bad_key)."""
  by_id: dict[str, list] = collections.defaultdict(list)
  for key, value in data.items():
    if (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str)
        and isinstance(value, dict)):
      by_id[key[0]].append(value)
    else:
      yield _key_id(key), None
  yield from ((nct_id, (nct_id, values)) for nct_id, values in by_id.items())


def _parse_trial(entry: tuple[str, list[dict]] | None, report: BuildReport) -> list[S.Trial]:
  if entry is None:
    raise SkipRecord("bad_key")
  nct_id, values = entry
  outcomes = []
  for v in values:
    e = parse_endpoint(v.get("endpoint"))
    title, desc = _str(e.get("measure")), _str(e.get("description"))
    outcomes.append(S.Outcome(
        title, desc, _OUTCOME_TYPES.get(_str(e.get("outcome_type")), "other"),
        _str(e.get("timeFrame")), "", "", (), (), infer_polarity(title, desc)))
  arms = []
  for a in _arm_dicts(values[0]):
    label = _str(a.get("label"))
    if not label:
      raise SkipRecord("bad_arms", "arm without label")
    arms.append(parts.arm(label, a.get("type"), _str(a.get("description")),
                          _interventions(a), report, SOURCE, nct_id))
  return [S.validate_trial(S.Trial(
      nct_id, SOURCE, _str(values[0].get("brief_title")), "", (), (), None, "", "",
      tuple(arms), tuple(outcomes), None))]


def read_trials(path, report: BuildReport) -> list[S.Trial]:
  """One protocol-level Trial per NCT id: arms with doses, one value-less Outcome per endpoint.

  Counted in the report under source TRIALS_SOURCE (questions use SOURCE).
  """
  return read_files(path, ".pickle", TRIALS_SOURCE, report, load=load, records=_by_trial,
                    parse=_parse_trial)
