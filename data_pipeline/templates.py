"""The one place examples become (prompt, completion) text.

Every trainer, evaluator and tokenizer corpus sees text made here, so a change of
wording happens once. Prompts must fit a 512-token context with a ~8k BPE
vocabulary (about 3.5 characters per token on this text), so each field is cut by
characters with one rule (`clip`: at a word boundary, marked by "...") and the
whole prompt is held under PROMPT_CHAR_BUDGET by shrinking the field limits
step by step. The completion is a single DECISION line.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from data_pipeline.example import Anchor, Example, Factor

PROMPT_CHAR_BUDGET = 1500   # ~430 tokens at ~3.5 chars/token, leaves room for the answer
ELLIPSIS = "..."

# Per-field character limits at scale 1.0; `_fit` shrinks them all together.
LIMITS = {"title": 140, "endpoint": 200, "arm": 110, "option": 230,
          "anchor_title": 100, "anchor_endpoint": 140, "anchor_answer": 230,
          "factor_value": 80}
MAX_ARMS = 4
_SCALES = (1.0, 0.8, 0.6, 0.45, 0.3, 0.2)
_INSTRUCTION = ("Answer with one line DECISION: ({slots}), one non-negative score "
                "per option, in the order listed.")
_SPACES = re.compile(r"\s+")


def clip(text: str, n: int) -> str:
  """Collapses whitespace; cuts to at most n chars at a word boundary, adding '...'."""
  t = _SPACES.sub(" ", str(text or "")).strip()
  if len(t) <= n:
    return t
  cut = t[:max(n - len(ELLIPSIS), 1)]
  space = cut.rfind(" ")
  if space > len(cut) // 2:
    cut = cut[:space]
  return cut.rstrip(" ,;:.") + ELLIPSIS


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


def _options_block(options: Sequence[str], scale: float) -> list[str]:
  lim = int(LIMITS["option"] * scale)
  return [f"{i + 1}. {clip(o, lim)}" for i, o in enumerate(options)]


def _question_lines(ex: Example, scale: float, header: str = "") -> list[str]:
  """Title, endpoint, arms and numbered options of one question."""
  lines = [header] if header else []
  lines.append("Trial: " + clip(ex.title, int(LIMITS["title"] * scale)))
  lines.append("Endpoint: " + clip(ex.endpoint, int(LIMITS["endpoint"] * scale)))
  arms = ex.arms
  if arms:
    shown = [clip(a, int(LIMITS["arm"] * scale)) for a in arms[:MAX_ARMS]]
    more = f" (+{len(arms) - MAX_ARMS} more)" if len(arms) > MAX_ARMS else ""
    lines.append("Arms: " + "; ".join(shown) + more)
  lines.append("Options:")
  lines.extend(_options_block(ex.options, scale))
  return lines


def _anchor_lines(anchor: Anchor, scale: float) -> list[str]:
  """The anchor question, compact, with its observed (true) answer."""
  lines = ["Known result:"]
  lines.append("Trial: " + clip(anchor.title, int(LIMITS["anchor_title"] * scale)))
  lines.append("Endpoint: " + clip(anchor.endpoint, int(LIMITS["anchor_endpoint"] * scale)))
  lines.append("Observed: " + clip(anchor.answer, int(LIMITS["anchor_answer"] * scale)))
  return lines


def _factor_line(f: Factor, scale: float, bullet: str = "-") -> str:
  lim = int(LIMITS["factor_value"] * scale)
  return (f"{bullet} {f.factor}: {clip(f.anchor_value, lim) or '?'} -> "
          f"{clip(f.target_value, lim) or '?'}")


def _fit(build, what: str) -> str:
  """Renders with shrinking field limits until the prompt fits the budget."""
  for scale in _SCALES:
    text = "\n".join(build(scale))
    if len(text) <= PROMPT_CHAR_BUDGET:
      return text
  raise ValueError(f"{what}: prompt of {len(text)} chars does not fit "
                   f"{PROMPT_CHAR_BUDGET} even at the smallest field limits")


def _completion(ex: Example) -> str:
  return decision_line(ex.n_options, ex.label)


def render_question(ex: Example) -> tuple[str, str]:
  """A plain CT Open-style question -> (prompt, completion)."""
  instruction = _INSTRUCTION.format(slots=_slots(ex.n_options))
  return _fit(lambda s: _question_lines(ex, s) + [instruction], f"example {ex.id}"), _completion(ex)


def render_pair(ex: Example) -> tuple[str, str]:
  """Anchor question with its observed answer, the changed factor(s), the target question.

  A chain lists its one-factor steps numbered, in order; a pair lists its factor(s).
  """
  chain = ex.kind == "chain"

  def build(s):
    lines = _anchor_lines(ex.anchor, s)
    lines.append("Change one factor at a time:" if chain else "Changed:")
    lines.extend(_factor_line(f, s, f"{i + 1}" if chain else "-")
                 for i, f in enumerate(ex.factors))
    lines.extend(_question_lines(ex, s, header="Predict for:"))
    lines.append(_INSTRUCTION.format(slots=_slots(ex.n_options)))
    return lines

  return _fit(build, f"example {ex.id}"), _completion(ex)


def render_chain_step(ex: Example, step_index: int, current_result: str) -> tuple[str, str]:
  """One step of successive imagining: current (imagined) result + next change -> new result.

  `current_result` is the anchor's observed answer at step 0, else the option
  sentence the model chose at the previous step. The options are the target's;
  the completion is the target's DECISION line on the last step and '' before it
  (intermediate results are imagined, not observed).
  """
  factors = ex.factors
  if not 0 <= step_index < len(factors):
    raise ValueError(f"example {ex.id}: step {step_index} of {len(factors)}")

  def build(s):
    lines = ["Current result: " + clip(current_result, int(LIMITS["anchor_answer"] * s))]
    lines.append(f"Next change (step {step_index + 1} of {len(factors)}):")
    lines.append(_factor_line(factors[step_index], s))
    lines.extend(_question_lines(ex, s, header="New result for:"))
    lines.append(_INSTRUCTION.format(slots=_slots(ex.n_options)))
    return lines

  prompt = _fit(build, f"example {ex.id} step {step_index}")
  last = step_index == len(factors) - 1
  return prompt, (_completion(ex) if last else "")


def render_synthetic(ex: Example) -> tuple[str, str]:
  """The controlled dose task: few, repeated words so a tiny model can learn it."""
  f = ex.synthetic
  rule = "more dose more response" if f.rule > 0 else "more dose less response"
  prompt = (f"anchor dose {f.anchor_dose} response {f.anchor_response} . "
            f"rule {rule} . target dose {f.target_dose} . "
            f"1 {ex.options[0]} . 2 {ex.options[1]} . answer")
  return prompt, _completion(ex)


_RENDERERS = {
    "question": render_question,
    "natural_pair": render_pair,
    "approximate_pair": render_pair,
    "chain": render_pair,
    "synthetic": render_synthetic,
}


def render(ex: Example) -> Example:
  """A copy of `ex` with `prompt` and `completion` rendered by its `kind`."""
  if ex.kind not in _RENDERERS:
    raise ValueError(f"example {ex.id}: unknown kind {ex.kind!r}; "
                     f"expected one of {sorted(_RENDERERS)}")
  if ex.n_options not in (2, 3):
    raise ValueError(f"example {ex.id}: field 'options' has {ex.n_options} entries, need 2 or 3")
  prompt, completion = _RENDERERS[ex.kind](ex)
  return dataclasses.replace(ex, prompt=prompt, completion=completion)
