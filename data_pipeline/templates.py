"""The one place examples become (prompt, completion) text.

Every trainer, evaluator and tokenizer corpus sees text made here, so a change of
wording happens once. Fields are shown whole while the prompt fits its budget;
when it does not, the longest fields are cut first, all to one common length
(`fit`: water-filling, cut at a word boundary and marked "..."), never the
wording around them. The budget is PROMPT_CHAR_BUDGET characters (~430 tokens at
~3.5 characters per token) at render; the build then tightens it where the
trained tokenizer says a prompt is still over `data.prompt_len` tokens
(`fit_to_tokens`), so no prompt is ever cut from the left downstream. Every
Example records how many fields were cut (`prompt_fields_cut`), so reports count
shortened prompts. The completion is a single DECISION line.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Callable, Sequence

from data_pipeline.example import Anchor, Example, Factor
from data_pipeline.questions import arms_from_options

PROMPT_CHAR_BUDGET = 1500
ELLIPSIS = "..."
MIN_FIELD = 24  # no field is cut below this many characters
MAX_ARMS = 4
FIT_ROUNDS = 8
_INSTRUCTION = ("Answer with one line DECISION: ({slots}), one non-negative score "
                "per option, in the order listed.")
_SPACES = re.compile(r"\s+")


class PromptTooLong(ValueError):
  """A prompt over budget even with every field at MIN_FIELD; names the example."""


@functools.lru_cache(maxsize=1 << 16)
def squash(text: str) -> str:
  """Whitespace runs as one space, ends stripped (cached: a target's fields recur in
  each of its pairs)."""
  return _SPACES.sub(" ", str(text or "")).strip()


def clip(text: str, n: int) -> str:
  """Collapses whitespace; cuts to at most n chars at a word boundary, adding '...'."""
  t = squash(text)
  if len(t) <= n:
    return t
  cut = t[:max(n - len(ELLIPSIS), 1)]
  space = cut.rfind(" ")
  if space > len(cut) // 2:
    cut = cut[:space]
  return cut.rstrip(" ,;:.") + ELLIPSIS


class Fields:
  """The cuttable fields of one prompt: `f(key, text)` is the text under the limit the
  fitting loop set for `key` (whole when none); the full lengths are recorded."""

  def __init__(self):
    self.limits: dict[str, int] = {}
    self.lengths: dict[str, int] = {}

  def __call__(self, key: str, text: str) -> str:
    t = squash(text)
    self.lengths[key] = len(t)
    return clip(t, self.limits[key]) if key in self.limits else t

  def n_cut(self) -> int:
    return sum(self.limits.get(k, n) < n for k, n in self.lengths.items())

  def cut_longest(self, excess: int) -> bool:
    """Lowers the longest fields to one common level that removes `excess` characters
    (never below MIN_FIELD); False when nothing is left to cut."""
    now = {k: min(n, self.limits.get(k, n)) for k, n in self.lengths.items()}
    sizes = sorted(now.values(), reverse=True)
    level, total = MIN_FIELD, 0
    for i, c in enumerate(sizes):
      total += c
      nxt = sizes[i + 1] if i + 1 < len(sizes) else 0
      lv = (total - excess) // (i + 1)
      if lv >= nxt:
        level = max(lv, MIN_FIELD)
        break
    changed = False
    for k, n in now.items():
      if n > level:
        self.limits[k] = level
        changed = True
    return changed


def fit(build: Callable[[Fields], list[str]], budget: int, what: str) -> tuple[str, int]:
  """(prompt, fields cut): `build(fields)` rendered whole, or with its longest fields cut
  until it is at most `budget` characters; PromptTooLong when it cannot fit."""
  fields = Fields()
  for _ in range(FIT_ROUNDS):
    text = "\n".join(build(fields))
    if len(text) <= budget:
      return text, fields.n_cut()
    if not fields.cut_longest(len(text) - budget):
      break
  raise PromptTooLong(f"{what}: prompt of {len(text)} chars does not fit {budget} "
                      f"even with every field cut to {MIN_FIELD} characters")


def decision_line(n_options: int, label: int) -> str:
  """One-hot DECISION line on the true option: decision_line(2, 1) == 'DECISION: (0, 1)'."""
  if n_options not in (2, 3):
    raise ValueError(f"n_options must be 2 or 3, got {n_options}")
  if not 0 <= label < n_options:
    raise ValueError(f"label {label} out of range for {n_options} options")
  return "DECISION: (" + ", ".join("1" if i == label else "0"
                                   for i in range(n_options)) + ")"


def _slots(n: int) -> str:
  return ", ".join(f"s{i + 1}" for i in range(n))


def _options_block(options: Sequence[str], f: Fields) -> list[str]:
  return [f"{i + 1}. {f(f'option{i}', o)}" for i, o in enumerate(options)]


def _question_lines(ex: Example, f: Fields, header: str = "") -> list[str]:
  """Title, endpoint, arms and numbered options of one question."""
  lines = [header] if header else []
  lines.append("Trial: " + f("title", ex.title))
  lines.append("Endpoint: " + f("endpoint", ex.endpoint))
  arms = ex.arms
  if arms:
    shown = [f(f"arm{i}", a) for i, a in enumerate(arms[:MAX_ARMS])]
    more = f" (+{len(arms) - MAX_ARMS} more)" if len(arms) > MAX_ARMS else ""
    lines.append("Arms: " + "; ".join(shown) + more)
  lines.append("Options:")
  lines.extend(_options_block(ex.options, f))
  return lines


def _anchor_lines(anchor: Anchor, f: Fields) -> list[str]:
  """The anchor question, compact, with its observed (true) answer."""
  return ["Known result:", "Trial: " + f("anchor_title", anchor.title),
          "Endpoint: " + f("anchor_endpoint", anchor.endpoint),
          "Observed: " + f("anchor_answer", anchor.answer)]


def _factor_line(factor: Factor, i: int, f: Fields, bullet: str = "-") -> str:
  return (f"{bullet} {factor.factor}: {f(f'from{i}', factor.anchor_value) or '?'} -> "
          f"{f(f'to{i}', factor.target_value) or '?'}")


def _completion(ex: Example) -> str:
  return decision_line(ex.n_options, ex.label)


def render_question(ex: Example, budget: int) -> tuple[str, str, int]:
  """A plain CT Open-style question -> (prompt, completion, fields cut)."""
  instruction = _INSTRUCTION.format(slots=_slots(ex.n_options))
  prompt, cut = fit(lambda f: _question_lines(ex, f) + [instruction], budget, f"example {ex.id}")
  return prompt, _completion(ex), cut


def render_pair(ex: Example, budget: int) -> tuple[str, str, int]:
  """Anchor question with its observed answer, the steps to take (the factors that
  differ, in the walk's order), the target question. A chain numbers its steps."""
  chain = ex.kind == "chain"

  def build(f):
    lines = _anchor_lines(ex.anchor, f)
    if ex.factors:
      lines.append("Change one factor at a time:" if chain else "Changed:")
      lines.extend(_factor_line(x, i, f, f"{i + 1}" if chain else "-")
                   for i, x in enumerate(ex.factors))
    else:
      lines.append("Changed: no known factor differs")
    lines.extend(_question_lines(ex, f, header="Predict for:"))
    lines.append(_INSTRUCTION.format(slots=_slots(ex.n_options)))
    return lines

  prompt, cut = fit(build, budget, f"example {ex.id}")
  return prompt, _completion(ex), cut


def render_chain_step(ex: Example, step_index: int, current_result: str,
                      budget: int = PROMPT_CHAR_BUDGET,
                      n_tokens: Callable[[str], int] | None = None,
                      max_tokens: int = 0) -> tuple[str, str]:
  """One step of successive imagining: current (imagined) result + next change -> new result.

  `current_result` is the anchor's observed answer at step 0, else the option
  sentence the model chose at the previous step. The options are the target's;
  the completion is the target's DECISION line on the last step and '' before it
  (intermediate results are imagined, not observed). Given `n_tokens` and
  `max_tokens`, the prompt is also fitted to that many tokens (as fit_to_tokens).
  """
  factors = ex.factors
  if not 0 <= step_index < len(factors):
    raise ValueError(f"example {ex.id}: step {step_index} of {len(factors)}")
  what = f"example {ex.id} step {step_index}"

  def build(f):
    lines = ["Current result: " + f("current", current_result)]
    lines.append(f"Next change (step {step_index + 1} of {len(factors)}):")
    lines.append(_factor_line(factors[step_index], 0, f))
    lines.extend(_question_lines(ex, f, header="New result for:"))
    lines.append(_INSTRUCTION.format(slots=_slots(ex.n_options)))
    return lines

  prompt, _ = _fit_tokens(build, budget, n_tokens, max_tokens, what)
  last = step_index == len(factors) - 1
  return prompt, (_completion(ex) if last else "")


# Per-arm results ----------------------------------------------------------------
# A per-arm walk carries the endpoint's value in the two compared arms (the study
# arm, arm_a, and its comparator, arm_b) instead of an option sentence: each step
# writes the target's arms' values after one more change (`arm_estimate`), and a
# last call compares them (`arm_compare`). One text form for a state, whether the
# registry observed it (training) or the model wrote it (a walk), so the operators
# meet at inference what they were trained on.

_NUMBER = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"
_ESTIMATE = re.compile(r"ESTIMATE:\s*\(\s*" + _NUMBER + r"\s*,\s*" + _NUMBER + r"\s*\)")
_ESTIMATE_INSTRUCTION = ("Answer with one line ESTIMATE: (v1, v2): the endpoint's value in "
                         "the first arm and in the second{unit}.")
_COMPARE_INSTRUCTION = ("Compare the arms' results above. " + _INSTRUCTION)


def format_value(x: float) -> str:
  """A value as a state and a completion show it: 4 significant digits ('12.35', '0.004')."""
  return f"{float(x):.4g}"


def estimate_line(a: float, b: float) -> str:
  """The completion of a per-arm step: estimate_line(12.3, 8) == 'ESTIMATE: (12.3, 8)'."""
  return f"ESTIMATE: ({format_value(a)}, {format_value(b)})"


def parse_estimate(text: str) -> tuple[float, float] | None:
  """The two values of the last ESTIMATE line in `text`; None when there is none or a value
  is not finite (the caller counts it: a failure, never an answer)."""
  found = _ESTIMATE.findall(text or "")
  if not found:
    return None
  a, b = (float(x) for x in found[-1])
  return (a, b) if math.isfinite(a) and math.isfinite(b) else None


def has_arm_values(x: Example | Anchor) -> bool:
  """Whether both compared arms' values are known (registry questions, not CT Open)."""
  return x.value_a is not None and x.value_b is not None and bool(x.arm_a and x.arm_b)


@dataclasses.dataclass(frozen=True)
class ArmState:
  """What a per-arm walk carries: an observed answer (the anchor's option sentence, or
  none) and the two compared arms' values (none when unknown). The values are never cut
  from a prompt; the sentence and the arm names may be. `arm_a` / `arm_b` name the arms
  the values are of when they are not the target's (the anchor's, at the start)."""
  observed: str = ""
  values: tuple[float, float] | None = None
  unit: str = ""
  arm_a: str = ""
  arm_b: str = ""

  def text(self) -> str:
    """One line for reports: the sentence and the values."""
    return " ".join(x for x in (self.observed, self._values(lambda k, t: t)) if x)

  def _values(self, f) -> str:
    if self.values is None:
      return ""
    u = f" {self.unit}" if self.unit else ""
    name = lambda key, arm: f" ({f(key, arm)})" if arm else ""
    return (f"first arm{name('state_arm_a', self.arm_a)} {format_value(self.values[0])}{u}; "
            f"second arm{name('state_arm_b', self.arm_b)} {format_value(self.values[1])}{u}")

  def lines(self, f: Fields, label: str) -> list[str]:
    out = [f"{label}: " + f("observed", self.observed)] if self.observed else []
    if self.values is not None:
      out.append("Values: " + self._values(f))
    return out


def anchor_state(anchor: Anchor) -> ArmState:
  """Where a per-arm walk starts: the anchor's observed answer, and its arms' values
  when the registry gives them."""
  if has_arm_values(anchor):
    return ArmState(anchor.answer, (anchor.value_a, anchor.value_b), anchor.unit,
                    anchor.arm_a, anchor.arm_b)
  return ArmState(anchor.answer)


def estimate_state(ex: Example, a: float, b: float) -> ArmState:
  """The state after a step: the values of ex's (the target's) two arms."""
  return ArmState(values=(a, b), unit=ex.unit)


def arm_estimate_steps(ex: Example) -> int:
  """Steps of a walk: one per differing factor, one when none is known (a per-arm walk
  then adds its comparison)."""
  return max(len(ex.factors), 1)


def compared_arms(ex: Example) -> tuple[str, str] | None:
  """(study arm, comparator) of a question: its fields, else as its options name them
  (CT Open's questions name arms only there); None for a question about no two arms
  (an endpoint met or not)."""
  if ex.arm_a and ex.arm_b:
    return ex.arm_a, ex.arm_b
  return arms_from_options(ex.options)


def _arm_lines(ex: Example, f: Fields) -> list[str]:
  arms = compared_arms(ex)
  if arms is None:
    raise ValueError(f"example {ex.id}: a per-arm prompt needs two compared arms (fields "
                     f"'arm_a' and 'arm_b', or options that name them)")
  return ["First arm: " + f("arm_a", arms[0]), "Second arm: " + f("arm_b", arms[1])]


def render_arm_estimate_step(ex: Example, step_index: int, state: ArmState,
                             budget: int = PROMPT_CHAR_BUDGET,
                             n_tokens: Callable[[str], int] | None = None,
                             max_tokens: int = 0) -> tuple[str, str, int]:
  """One per-arm step: the current state + the next change -> the values of the target's
  two arms after it. (prompt, completion, fields cut).

  `state` is anchor_state(anchor) at step 0, else estimate_state of the previous
  step's values. The completion is the target's observed ESTIMATE line on the last
  step when both values are known, '' otherwise (an intermediate trial was never
  run). A pair with no known differing factor has one step ("no known factor
  differs"). Fitted to max_tokens as render_chain_step.
  """
  factors, n = ex.factors, arm_estimate_steps(ex)
  if not 0 <= step_index < n:
    raise ValueError(f"example {ex.id}: per-arm step {step_index} of {n}")
  _arm_lines(ex, lambda key, text: text)  # raises for a question about no two arms
  what = f"example {ex.id} per-arm step {step_index}"

  def build(f):
    lines = state.lines(f, "Current result")
    if factors:
      lines.append(f"Next change (step {step_index + 1} of {n}):")
      lines.append(_factor_line(factors[step_index], 0, f))
    else:
      lines.append("Next change: no known factor differs")
    lines.append("New per-arm result for:")
    lines.append("Trial: " + f("title", ex.title))
    lines.append("Endpoint: " + f("endpoint", ex.endpoint))
    lines.extend(_arm_lines(ex, f))
    lines.append(_ESTIMATE_INSTRUCTION.format(unit=f" ({ex.unit})" if ex.unit else ""))
    return lines

  prompt, cut = _fit_tokens(build, budget, n_tokens, max_tokens, what)
  last = step_index == n - 1
  completion = estimate_line(ex.value_a, ex.value_b) if last and has_arm_values(ex) else ""
  return prompt, completion, cut


def render_arm_compare(ex: Example, state: ArmState, budget: int = PROMPT_CHAR_BUDGET,
                       n_tokens: Callable[[str], int] | None = None,
                       max_tokens: int = 0) -> tuple[str, str, int]:
  """The comparison that ends a per-arm walk: the target's two arms' values (`state`,
  estimate_state) and the question -> its DECISION. (prompt, completion, fields cut)."""
  if state.values is None:
    raise ValueError(f"example {ex.id}: a per-arm comparison needs the arms' values")
  what = f"example {ex.id} per-arm comparison"

  def build(f):
    lines = state.lines(f, "Result")
    lines.extend(_arm_lines(ex, f))
    lines.extend(_question_lines(ex, f, header="Question:"))
    lines.append(_COMPARE_INSTRUCTION.format(slots=_slots(ex.n_options)))
    return lines

  prompt, cut = _fit_tokens(build, budget, n_tokens, max_tokens, what)
  return prompt, _completion(ex), cut


def _render_arm_estimate(ex: Example, budget: int) -> tuple[str, str, int]:
  """A training `arm_estimate`: a pair with at most one differing factor whose two sides
  both have per-arm values; the anchor's values + the change -> the target's."""
  if len(ex.factors) > 1 or ex.anchor is None or not (has_arm_values(ex)
                                                      and has_arm_values(ex.anchor)):
    raise ValueError(f"example {ex.id}: an arm_estimate needs an anchor, at most one factor "
                     f"and per-arm values on both sides")
  return render_arm_estimate_step(ex, 0, anchor_state(ex.anchor), budget)


def _render_arm_compare(ex: Example, budget: int) -> tuple[str, str, int]:
  """A training `arm_compare`: a question shown with its arms' observed values."""
  if not has_arm_values(ex):
    raise ValueError(f"example {ex.id}: an arm_compare needs per-arm values")
  return render_arm_compare(ex, estimate_state(ex, ex.value_a, ex.value_b), budget)


_IMAGINE_INSTRUCTION = (
    "Imagine the known trial with the changes above made and nothing else. Explain in a few "
    "sentences how the last change moves the result, then end with one line DECISION: "
    "({slots}): the probability of each option, numbers in [0, 1] that sum to 1.")


def render_imagine_request(ex: Example, step_index: int, current_result: str,
                           budget: int = PROMPT_CHAR_BUDGET) -> str:
  """The teacher's question for the result a walk reaches after step `step_index`: the
  anchor with its observed result, the changes already made, the result so far, the
  one new change and the target's options. The registry never ran that trial, so
  the teacher imagines it (deepimagine_jax/imagined.py)."""
  factors = ex.factors
  if ex.anchor is None or not 0 <= step_index < len(factors):
    raise ValueError(f"example {ex.id}: step {step_index} of {len(factors)} needs an anchor")

  def build(f):
    lines = _anchor_lines(ex.anchor, f)
    if step_index:
      lines.append("Changes already made:")
      lines.extend(_factor_line(x, i, f) for i, x in enumerate(factors[:step_index]))
    lines.append("Result so far: " + f("current", current_result))
    lines.append("New change:")
    lines.append(_factor_line(factors[step_index], step_index, f))
    lines.extend(_question_lines(ex, f, header="The question, for the changed trial:"))
    lines.append(_IMAGINE_INSTRUCTION.format(slots=_slots(ex.n_options)))
    return lines

  return fit(build, budget, f"example {ex.id} imagined step {step_index}")[0]


def render_synthetic(ex: Example, budget: int) -> tuple[str, str, int]:
  """The controlled dose task: few, repeated words so a tiny model can learn it."""
  f = ex.synthetic
  rule = "more dose more response" if f.rule > 0 else "more dose less response"
  prompt = (f"anchor dose {f.anchor_dose} response {f.anchor_response} . "
            f"rule {rule} . target dose {f.target_dose} . "
            f"1 {ex.options[0]} . 2 {ex.options[1]} . answer")
  if len(prompt) > budget:
    raise PromptTooLong(f"example {ex.id}: synthetic prompt of {len(prompt)} chars > {budget}")
  return prompt, _completion(ex), 0


_RENDERERS = {
    "question": render_question,
    "natural_pair": render_pair,
    "approximate_pair": render_pair,
    "chain": render_pair,
    "synthetic": render_synthetic,
    "arm_estimate": _render_arm_estimate,
    "arm_compare": _render_arm_compare,
}


def render(ex: Example, budget: int = PROMPT_CHAR_BUDGET) -> Example:
  """A copy of `ex` with `prompt`, `completion` and `prompt_fields_cut` rendered by its
  `kind`, the prompt at most `budget` characters."""
  if ex.kind not in _RENDERERS:
    raise ValueError(f"example {ex.id}: unknown kind {ex.kind!r}; "
                     f"expected one of {sorted(_RENDERERS)}")
  if ex.n_options not in (2, 3):
    raise ValueError(f"example {ex.id}: field 'options' has {ex.n_options} entries, need 2 or 3")
  prompt, completion, cut = _RENDERERS[ex.kind](ex, budget)
  return ex.replace(prompt=prompt, completion=completion, prompt_fields_cut=cut)


def _fit_tokens(build: Callable[[Fields], list[str]], budget: int,
                n_tokens: Callable[[str], int] | None, max_tokens: int,
                what: str) -> tuple[str, int]:
  """(prompt, fields cut): `fit` within `budget` characters, then within max_tokens tokens
  (_within_tokens) when n_tokens is given."""
  cut = [0]

  def render_at(b: int) -> str:
    prompt, cut[0] = fit(build, b, what)
    return prompt

  return _within_tokens(render_at, budget, n_tokens, max_tokens, what), cut[0]


def _within_tokens(render_at: Callable[[int], str], budget: int,
                   n_tokens: Callable[[str], int] | None, max_tokens: int, what: str) -> str:
  """render_at(budget), re-rendered with a budget scaled by tokens over until it is at
  most max_tokens (no n_tokens: the first render)."""
  text = render_at(budget)
  for _ in range(FIT_ROUNDS):
    n = n_tokens(text) if n_tokens is not None else 0
    if n <= max_tokens or n_tokens is None:
      return text
    text = render_at(int(len(text) * max_tokens / n) - 1)
  raise PromptTooLong(f"{what}: prompt of {n_tokens(text)} tokens does not fit {max_tokens} "
                      f"after {FIT_ROUNDS} rounds")


def fit_to_tokens(ex: Example, n_tokens: Callable[[str], int], max_tokens: int) -> Example:
  """`ex` re-rendered with a tighter character budget until n_tokens(prompt) <= max_tokens
  (the same example when it already fits); PromptTooLong when it cannot."""
  if n_tokens(ex.prompt) <= max_tokens:
    return ex
  fitted: list[Example] = []

  def render_at(budget: int) -> str:
    fitted[:] = [render(ex, budget)]
    return fitted[0].prompt

  _within_tokens(render_at, int(len(ex.prompt) * max_tokens / n_tokens(ex.prompt)) - 1,
                 n_tokens, max_tokens, f"example {ex.id}")
  return fitted[0]
