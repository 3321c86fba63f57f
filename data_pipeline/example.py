"""`Example`: the one record every source and every kind of example is.

Readers and builders make Examples; templates fill `prompt` / `completion`; the
build writes them as JSON lines (`to_json`) and `BuiltData.examples` reads them
back (`Example.from_json`). Every field has one type for every source, so no
consumer branches on where a record came from or reads a field with a default.
Nothing mutates an Example: changes are `ex.replace(...)` (as dataclasses.replace).

Fields (defaults in brackets; "" / -1 / () / None mean "does not apply"):
  id               unique, deterministic ("ct_open:Winter_2025:NCT..:<hash>:0",
                   "ctgov_xml:NCT..:o0:a0:superiority", "natural_pair:<anchor id>-><target id>")
  source           one of SOURCES: ct_open | ctgov_xml | ctgov_json | evidence_inference | synthetic
  kind             one of KINDS: question | natural_pair | approximate_pair | chain | synthetic |
                   imagined_step (a teacher-imagined intermediate result, deepimagine_jax/imagined.py) |
                   arm_estimate | arm_compare (ARM_KINDS: the per-arm operators)
  trial_id         the target trial (NCT id; "PMC<id>" for Evidence Inference)
  options          tuple[str, ...], 2 or 3 option sentences
  label            index of the true option in `options`
  perturbation     [""] '+'-joined sorted factors of a pair / chain (facts.FACTORS: population,
                   condition, drug, dose, comparator, outcome, phase, allocation, masking,
                   country, sample_size); "" when none differs; "dose" for synthetic
  anchor_trial_id  [""] the anchor's trial for pairs, chains and synthetic
  prompt, completion  [""] filled by templates.render ("DECISION: (1, 0)" completion)
  prompt_fields_cut [0] how many fields templates.render cut so the prompt fits its budget
                   (0: the prompt shows every field whole)
  split            [""] train | dev | rl | eval after splits.assign_splits; a CT Open
                   question carries its release ("Winter_2025") until then
  category         [""] CT Open category ("2-way/explicit")
  nct_id, endpoint_str, question_index   [""/""/-1] CT Open keys (the benchmark's key)
  meta_label       [""] CT Open meta label (single_arm, no_arm, ...)
  title            [""] trial title
  endpoint         [""] the endpoint as one line of text (CT Open's endpoint dict is
                   rendered at read time: "<measure>. Time frame: <tf>. <description>")
  arms             [()] tuple[str, ...], one line per arm
  question_type    [""] superiority | comparative | endpoint_met | neutral_higher (derived
                   questions), ico_direction (Evidence Inference); "" for CT Open
  label_basis      [""] how the label was decided (derived questions)
  outcome_index    [-1] index of the outcome in its Trial (derived questions)
  outcome_title    [""] the endpoint's title: the outcome title, CT Open's measure, the
                   Evidence Inference outcome
  outcome_type     [""] primary | secondary | other (derived questions)
  polarity         [""] higher_better | lower_better | unknown (derived questions)
  arm_a, arm_b     [""] the study arm and the comparator as named in the options
  arm_a_id, arm_b_id, group_a_id, group_b_id, group_a_title, group_b_title
                   [""] protocol arm ids, result group ids and titles (derived questions)
  facts            [None] Facts: factor values from the question's Trial (pairs.attach_facts);
                   None on pairs
  anchor           [None] Anchor: the anchor question of a pair / chain, with its label
  factors          [()] tuple[Factor, ...]: what changed, anchor -> target, in the walk's
                   order (data.factor_order): the steps to take
  unknown_factors  [()] tuple[str, ...]: factors unknown on one side or both (approximate
                   pairs, chains): they cannot be compared, so they are no step
  similarity       [None] retrieval similarity of the two trials (approximate pairs, chains)
  synthetic        [None] SyntheticTask: the controlled dose task's numbers
  value_a, value_b [None] the observed values of the endpoint in arm_a and arm_b (derived
                   questions: the registry's per-arm results); None where the source has
                   none (CT Open). Imagining's per-arm walk starts from an anchor's values
  unit             [""] the unit of value_a / value_b (the outcome's)
  public_date      [""] ISO date the question's result became public: CT Open, its release's
                   cutoff (Winter_2025 2025-02-01, Summer_2025 2025-09-01); registry
                   questions, the trial's results-first-posted date. A target is predicted
                   as of this date: a cross-trial anchor must be public strictly before it
                   (anchors.time_respecting); a pair carries the target's date and
                   `anchor.public_date` the anchor's
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Mapping

SOURCES = ("ct_open", "ctgov_xml", "ctgov_json", "evidence_inference", "synthetic")
PAIR_KINDS = ("natural_pair", "approximate_pair", "chain")
# The per-arm operators, for training only (never in a held-out split): `arm_estimate`
# (an anchor's per-arm values + one change -> the target's per-arm values) and
# `arm_compare` (a question with per-arm values -> its decision).
ARM_KINDS = ("arm_estimate", "arm_compare")
KINDS = ("question",) + PAIR_KINDS + ("synthetic", "imagined_step") + ARM_KINDS


class ExampleError(ValueError):
  """A JSON record that is not an Example; the message names the record id and field."""


@dataclasses.dataclass(frozen=True, slots=True)
class Facts:
  """The factor values of one question, "" where unknown (see facts.facts_of)."""
  country: str = ""  # '+'-joined regions of the trial's countries
  population: str = ""  # "adult", "pediatric, female", ...
  phase: str = ""
  comparator: str = ""  # placebo | active | no intervention
  dose: str = ""  # "20 mg"
  dose_frequency: str = ""
  outcome: str = ""
  arm_a: str = ""
  arm_b: str = ""
  drugs: tuple[str, ...] = ()  # sorted normalised names of the study arm's active drugs
  condition: str = ""  # "; "-joined conditions of the trial
  drug: str = ""  # the drugs as one value ("drug a + drug b"): the intervention factor
  allocation: str = ""  # RANDOMIZED | NON_RANDOMIZED | NA
  masking: str = ""  # NONE | SINGLE | ... | QUADRUPLE
  sample_size: str = ""  # enrollment bucket ("100-299"), facts.size_bucket


@dataclasses.dataclass(frozen=True, slots=True)
class Factor:
  """One changed factor of a pair or one step of a chain."""
  factor: str
  anchor_value: str
  target_value: str


@dataclasses.dataclass(frozen=True, slots=True)
class SyntheticTask:
  """The controlled dose task (synthetic.py): the label follows from rule and doses."""
  anchor_dose: int
  target_dose: int
  rule: int  # +1: more dose more response; -1: more dose less response
  anchor_response: int


@dataclasses.dataclass(frozen=True, slots=True)
class Anchor:
  """The anchor question of a pair or chain, shown with its observed answer."""
  id: str
  trial_id: str
  title: str
  endpoint: str
  arms: tuple[str, ...]
  options: tuple[str, ...]
  label: int
  question_type: str
  public_date: str = ""  # when this result became public (Example.public_date)
  arm_a: str = ""  # the arms the observed answer compares, as in its options
  arm_b: str = ""
  value_a: float | None = None  # their observed values (Example.value_a), None if unknown
  value_b: float | None = None
  unit: str = ""

  @classmethod
  def of(cls, question: Example) -> Anchor:
    return cls(**{f.name: getattr(question, f.name) for f in dataclasses.fields(cls)})

  @property
  def answer(self) -> str:
    """The observed (true) option sentence."""
    return self.options[self.label]


@dataclasses.dataclass(frozen=True, slots=True)
class Example:
  """One question, pair, chain or synthetic example (fields: see the module docstring)."""
  id: str
  source: str
  kind: str
  trial_id: str
  options: tuple[str, ...]
  label: int
  perturbation: str = ""
  anchor_trial_id: str = ""
  prompt: str = ""
  completion: str = ""
  split: str = ""
  category: str = ""
  nct_id: str = ""
  endpoint_str: str = ""
  question_index: int = -1
  meta_label: str = ""
  title: str = ""
  endpoint: str = ""
  arms: tuple[str, ...] = ()
  question_type: str = ""
  label_basis: str = ""
  outcome_index: int = -1
  outcome_title: str = ""
  outcome_type: str = ""
  polarity: str = ""
  arm_a: str = ""
  arm_b: str = ""
  arm_a_id: str = ""
  arm_b_id: str = ""
  group_a_id: str = ""
  group_b_id: str = ""
  group_a_title: str = ""
  group_b_title: str = ""
  facts: Facts | None = None
  anchor: Anchor | None = None
  factors: tuple[Factor, ...] = ()
  unknown_factors: tuple[str, ...] = ()
  similarity: float | None = None
  synthetic: SyntheticTask | None = None
  public_date: str = ""
  value_a: float | None = None
  value_b: float | None = None
  unit: str = ""
  prompt_fields_cut: int = 0

  @classmethod
  def pair(cls, anchor: Example, target: Example, kind: str, factors, *,
           unknown_factors=(), similarity: float | None = None) -> Example:
    """A pair / chain Example (unrendered): the target's question and label, the anchor
    question with its answer, the changed factors (Factor records) in order."""
    factors = tuple(factors)
    return target.replace(
        id=f"{kind}:{anchor.id}->{target.id}", kind=kind,
        perturbation="+".join(sorted({f.factor for f in factors})),
        anchor_trial_id=anchor.trial_id, anchor=Anchor.of(anchor), factors=factors,
        unknown_factors=tuple(unknown_factors), similarity=similarity, facts=None,
        prompt="", completion="", split="", prompt_fields_cut=0)

  @property
  def n_options(self) -> int:
    return len(self.options)

  def replace(self, **changes) -> Example:
    """A copy with `changes`: dataclasses.replace's result (tested equal), built without
    the generated __init__ (a build makes millions of copies; Example validates nothing
    there). An unknown field is a TypeError, as there."""
    unknown = changes.keys() - _FIELD_SET
    if unknown:
      raise TypeError(f"Example has no field(s) {sorted(unknown)}")
    new = object.__new__(Example)
    for name in _FIELD_NAMES:
      object.__setattr__(new, name, changes[name] if name in changes else getattr(self, name))
    return new

  def to_json(self) -> dict[str, Any]:
    """A JSON-ready dict of every field (tuples as lists, nested records as dicts)."""
    return _encode(self)

  @classmethod
  def from_json(cls, record: Mapping[str, Any]) -> Example:
    """The inverse of to_json (exact round trip). Absent fields with a default take it;
    an unknown field or a wrong type raises ExampleError naming the id and field."""
    rid = record.get("id", "?") if isinstance(record, Mapping) else "?"
    return _decode(cls, record, "", rid)


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Example))
_FIELD_SET = frozenset(_FIELD_NAMES)


def _encode(x):
  if dataclasses.is_dataclass(x):
    return {f.name: _encode(getattr(x, f.name)) for f in dataclasses.fields(x)}
  if isinstance(x, tuple):
    return [_encode(v) for v in x]
  return x


@functools.cache
def _fields(cls) -> tuple[dict[str, Any], frozenset[str]]:
  """{field name: type} and the names without a default."""
  hints = typing.get_type_hints(cls)
  fields = dataclasses.fields(cls)
  required = frozenset(f.name for f in fields if f.default is dataclasses.MISSING
                       and f.default_factory is dataclasses.MISSING)
  return {f.name: hints[f.name] for f in fields}, required


def _decode(tp, value, where: str, rid):
  def fail(expected: str):
    raise ExampleError(f"example {rid!r}: field {where or '<record>'!r}: expected "
                       f"{expected}, got {type(value).__name__} {str(value)[:60]!r}")

  origin = typing.get_origin(tp)
  if origin in (types.UnionType, typing.Union):  # `X | None`
    (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return None if value is None else _decode(inner, value, where, rid)
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      fail("a list")
    item = typing.get_args(tp)[0]
    return tuple(_decode(item, v, f"{where}[{i}]", rid) for i, v in enumerate(value))
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, Mapping):
      fail(f"an object ({tp.__name__})")
    types_, required = _fields(tp)
    unknown = sorted(set(value) - set(types_))
    missing = sorted(required - set(value))
    if unknown or missing:
      what = "; ".join(x for x in (unknown and f"unknown field(s) {unknown}",
                                   missing and f"missing field(s) {missing}") if x)
      raise ExampleError(f"example {rid!r}: {where + ': ' if where else ''}{what}")
    sep = "." if where else ""
    return tp(**{k: _decode(types_[k], v, f"{where}{sep}{k}", rid) for k, v in value.items()})
  if tp is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      fail("a number")
    return float(value)
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      fail("an integer")
    return value
  if tp is str:
    if not isinstance(value, str):
      fail("a string")
    return value
  raise TypeError(f"example field type {tp!r} is not supported")
