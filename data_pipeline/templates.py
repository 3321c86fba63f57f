"""The one place examples become (prompt, completion) text.

Every trainer, evaluator and tokenizer corpus sees text made here, so a change of
wording happens once. Prompts must fit a 512-token context with a ~8k BPE
vocabulary (about 3.5 characters per token on this text), so each field is cut by
characters with one rule (`clip`: at a word boundary, marked by "...") and the
whole prompt is held under PROMPT_CHAR_BUDGET by shrinking the field limits
step by step. The completion is a single DECISION line.
"""
from __future__ import annotations

import re
from typing import Sequence

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


def decision_line_from_probs(probs: Sequence[float]) -> str:
  """A DECISION line of normalised scores rounded to 3 decimals: (0.7, 0.3)."""
  ps = [float(p) for p in probs]
  if len(ps) not in (2, 3) or any(not p >= 0 for p in ps) or sum(ps) <= 0:
    raise ValueError(f"need 2 or 3 non-negative scores with a positive sum, got {ps}")
  total = sum(ps)
  return "DECISION: (" + ", ".join(f"{round(p / total, 3):g}" for p in ps) + ")"


def _slots(n: int) -> str:
  return ", ".join(f"s{i + 1}" for i in range(n))


def _options_block(options: Sequence[str], scale: float) -> list[str]:
  lim = int(LIMITS["option"] * scale)
  return [f"{i + 1}. {clip(o, lim)}" for i, o in enumerate(options)]


def endpoint_text(ex: dict) -> str:
  """The endpoint as one line; CT Open examples carry it as a dict."""
  e = ex.get("endpoint", "")
  if isinstance(e, dict):
    tf = f" Time frame: {e['timeFrame']}." if e.get("timeFrame") else ""
    desc = f" {e['description']}" if e.get("description") else ""
    return f"{e.get('measure', '')}.{tf}{desc}"
  return str(e or "")


def arm_lines(ex: dict) -> list[str]:
  """`arms` (list of str), else CT Open's newline-separated `arms_text`."""
  if ex.get("arms"):
    return [str(a) for a in ex["arms"]]
  return [ln.strip().lstrip("- ") for ln in str(ex.get("arms_text") or "").splitlines()
          if ln.strip()]


def _question_lines(ex: dict, scale: float, header: str = "") -> list[str]:
  """Title, endpoint, arms and numbered options of one question."""
  lines = [header] if header else []
  lines.append("Trial: " + clip(ex.get("title", ""), int(LIMITS["title"] * scale)))
  lines.append("Endpoint: " + clip(endpoint_text(ex), int(LIMITS["endpoint"] * scale)))
  arms = arm_lines(ex)
  if arms:
    shown = [clip(a, int(LIMITS["arm"] * scale)) for a in arms[:MAX_ARMS]]
    more = f" (+{len(arms) - MAX_ARMS} more)" if len(arms) > MAX_ARMS else ""
    lines.append("Arms: " + "; ".join(shown) + more)
  lines.append("Options:")
  lines.extend(_options_block(ex["options"], scale))
  return lines


def _anchor_lines(anchor: dict, scale: float) -> list[str]:
  """The anchor question, compact, with its observed (true) answer."""
  answer = anchor["options"][anchor["label"]]
  lines = ["Known result:"]
  lines.append("Trial: " + clip(anchor.get("title", ""), int(LIMITS["anchor_title"] * scale)))
  lines.append("Endpoint: " + clip(endpoint_text(anchor), int(LIMITS["anchor_endpoint"] * scale)))
  lines.append("Observed: " + clip(answer, int(LIMITS["anchor_answer"] * scale)))
  return lines


def _factor_line(f: dict, scale: float) -> str:
  lim = int(LIMITS["factor_value"] * scale)
  return (f"- {f['factor']}: {clip(f.get('anchor_value', ''), lim) or '?'} -> "
          f"{clip(f.get('target_value', ''), lim) or '?'}")


def _fit(build, what: str) -> str:
  """Renders with shrinking field limits until the prompt fits the budget."""
  for scale in _SCALES:
    text = "\n".join(build(scale))
    if len(text) <= PROMPT_CHAR_BUDGET:
      return text
  raise ValueError(f"{what}: prompt of {len(text)} chars does not fit "
                   f"{PROMPT_CHAR_BUDGET} even at the smallest field limits")


def _completion(ex: dict) -> str:
  return decision_line(len(ex["options"]), int(ex["label"]))


def render_question(ex: dict) -> tuple[str, str]:
  """A plain CT Open-style question -> (prompt, completion)."""
  n = len(ex["options"])
  prompt = _fit(lambda s: _question_lines(ex, s) + [_INSTRUCTION.format(slots=_slots(n))],
                f"example {ex.get('id', '?')}")
  return prompt, _completion(ex)


def render_pair(ex: dict) -> tuple[str, str]:
  """Anchor question with its observed answer, the changed factor(s), the target question."""
  n = len(ex["options"])

  def build(s):
    lines = _anchor_lines(ex["anchor"], s)
    lines.append("Changed:")
    lines.extend(_factor_line(f, s) for f in ex.get("factors", []))
    lines.extend(_question_lines(ex, s, header="Predict for:"))
    lines.append(_INSTRUCTION.format(slots=_slots(n)))
    return lines

  return _fit(build, f"example {ex.get('id', '?')}"), _completion(ex)


def render_chain(ex: dict) -> tuple[str, str]:
  """A chain example: anchor, every one-factor step in order, then the target question."""
  n = len(ex["options"])

  def build(s):
    lines = _anchor_lines(ex["anchor"], s)
    lines.append("Change one factor at a time:")
    lines.extend(f"{i + 1}{_factor_line(f, s)[1:]}" for i, f in enumerate(ex.get("factors", [])))
    lines.extend(_question_lines(ex, s, header="Predict for:"))
    lines.append(_INSTRUCTION.format(slots=_slots(n)))
    return lines

  return _fit(build, f"example {ex.get('id', '?')}"), _completion(ex)


def render_chain_step(ex: dict, step_index: int, current_result: str) -> tuple[str, str]:
  """One step of successive imagining: current (imagined) result + next change -> new result.

  `current_result` is the anchor's observed answer at step 0, else the option
  sentence the model chose at the previous step. The options are the target's;
  the completion is the target's DECISION line on the last step and '' before it
  (intermediate results are imagined, not observed).
  """
  factors = ex.get("factors", [])
  if not 0 <= step_index < len(factors):
    raise ValueError(f"example {ex.get('id', '?')}: step {step_index} of {len(factors)}")
  n = len(ex["options"])

  def build(s):
    lines = ["Current result: " + clip(current_result, int(LIMITS["anchor_answer"] * s))]
    lines.append(f"Next change (step {step_index + 1} of {len(factors)}):")
    lines.append(_factor_line(factors[step_index], s))
    lines.extend(_question_lines(ex, s, header="New result for:"))
    lines.append(_INSTRUCTION.format(slots=_slots(n)))
    return lines

  prompt = _fit(build, f"example {ex.get('id', '?')} step {step_index}")
  last = step_index == len(factors) - 1
  return prompt, (_completion(ex) if last else "")


def render_synthetic(ex: dict) -> tuple[str, str]:
  """The controlled dose task: few, repeated words so a tiny model can learn it."""
  f = ex["synthetic"]
  rule = "more dose more response" if f["rule"] > 0 else "more dose less response"
  prompt = (f"anchor dose {f['anchor_dose']} response {f['anchor_response']} . "
            f"rule {rule} . target dose {f['target_dose']} . "
            f"1 {ex['options'][0]} . 2 {ex['options'][1]} . answer")
  return prompt, _completion(ex)


_RENDERERS = {
    "question": render_question,
    "natural_pair": render_pair,
    "approximate_pair": render_pair,
    "chain": render_chain,
    "synthetic": render_synthetic,
}


def render(ex: dict) -> dict:
  """Fills ex['prompt'] and ex['completion'] (in place) by `kind`; returns ex."""
  kind = ex.get("kind", "")
  if kind not in _RENDERERS:
    raise ValueError(f"example {ex.get('id', '?')}: unknown kind {kind!r}; "
                     f"expected one of {sorted(_RENDERERS)}")
  n = len(ex.get("options") or [])
  if n not in (2, 3):
    raise ValueError(f"example {ex.get('id', '?')}: field 'options' has {n} entries, need 2 or 3")
  ex["prompt"], ex["completion"] = _RENDERERS[kind](ex)
  return ex
