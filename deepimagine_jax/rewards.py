"""Verifiable rewards: the one DECISION-line parser and registered reward functions.

The parser follows the CT Open benchmark's `evaluations/evaluation.py`
(github.com/ClinicalTrial-OpenChallenge/CT_Open): strip markdown (`*`, `#`, code
fences), take the text after the LAST occurrence of the exact, case-sensitive
`DECISION:` up to the end of that line, read a parenthesised tuple of scores,
normalise it to probabilities, argmax is the choice (ties: lowest index, as
`np.argmax`). "decision: (1, 0)" is therefore NOT a decision, as in the benchmark.

Where this parser is stricter than the benchmark (so a reward never pays for
output the benchmark would read differently or crash on):
  * text after the closing parenthesis on the same line is rejected (only
    whitespace and one optional period may follow); the benchmark ignores it;
  * scores must be plain decimal numbers (ints, floats, scientific notation,
    optional leading '+'); no hex, booleans, underscores, nan or inf;
  * all-zero scores are a format failure: they cannot be normalised (the
    benchmark would divide 0/0 and score NaN);
  * a trailing comma "(1, 0,)" is rejected as a wrong count.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Sequence

import numpy as np

DECISION_TAG = "DECISION:"
# Floor of the probability given to the true option in `log_prob`; the same
# floor the benchmark's cross-entropy uses (max(p, 1e-12)).
LOG_PROB_EPS = 1e-12
LOG_PROB_FLOOR = math.log(LOG_PROB_EPS)
# Worst multi-class Brier score (all mass on one wrong option); paid on a parse failure.
BRIER_FLOOR = -2.0

# Stable error codes (the part of `Decision.error` before ':'), for counting.
ERROR_CODES = (
    "not_text", "bad_n_options", "no_decision_line", "no_open_paren",
    "unbalanced_parens", "trailing_text", "wrong_count", "non_numeric",
    "negative", "non_finite", "all_zero", "internal",
)

_NUMBER_RE = re.compile(r"\+?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NEG_NUMBER_RE = re.compile(r"-\s*(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NON_FINITE_RE = re.compile(r"[+-]?(?:inf|infinity|nan)", re.IGNORECASE)
_TAIL_RE = re.compile(r"\s*\.?\s*")


@dataclasses.dataclass(frozen=True)
class Decision:
  """A parsed DECISION line; `error` is '' when ok, else 'code: detail'."""
  ok: bool
  probs: np.ndarray | None = None  # float64 [n_options], sums to 1
  choice: int | None = None
  error: str = ""

  @property
  def error_code(self) -> str:
    return self.error.split(":", 1)[0]


def _fail(code: str, detail: str) -> Decision:
  return Decision(ok=False, error=f"{code}: {detail}")


def _strip_markdown(text: str) -> str:
  """The benchmark's own cleanup, so '**DECISION:** (1, 0)' reads the same."""
  for token in ("*", "#", "```python", "```"):
    text = text.replace(token, "")
  return text


def _parse_scores(line: str, n_options: int) -> Decision:
  if not line.startswith("("):
    return _fail("no_open_paren", f"expected '(' after {DECISION_TAG}, got {line[:40]!r}")
  close = line.find(")")
  if close < 0 or "(" in line[1:close]:
    return _fail("unbalanced_parens", repr(line[:80]))
  inner, tail = line[1:close], line[close + 1:]
  if ")" in tail or "(" in tail:
    return _fail("unbalanced_parens", repr(line[:80]))
  if not _TAIL_RE.fullmatch(tail):
    return _fail("trailing_text", f"{tail[:40]!r} after ')'")
  items = [s.strip() for s in inner.split(",")]
  if len(items) != n_options:
    return _fail("wrong_count", f"expected {n_options} scores, got {len(items)}")
  scores = []
  for i, item in enumerate(items):
    if _NUMBER_RE.fullmatch(item):
      value = float(item)
    elif _NEG_NUMBER_RE.fullmatch(item):
      if float(item.replace(" ", "")) == 0.0:  # "-0" is zero, not negative
        value = 0.0
      else:
        return _fail("negative", f"score {i} is {item!r}")
    elif _NON_FINITE_RE.fullmatch(item):
      return _fail("non_finite", f"score {i} is {item!r}")
    else:
      return _fail("non_numeric", f"score {i} is {item[:40]!r}")
    if not math.isfinite(value):  # e.g. 1e999 overflows to inf
      return _fail("non_finite", f"score {i} is {item[:40]!r}")
    scores.append(value)
  raw = np.asarray(scores, dtype=np.float64)
  top = raw.max()
  if top <= 0.0:
    return _fail("all_zero", "scores cannot be normalised")
  raw = raw / top  # scale first so huge scores cannot overflow the sum
  probs = raw / raw.sum()
  probs.setflags(write=False)
  return Decision(ok=True, probs=probs, choice=int(np.argmax(probs)))


def parse_decision(text: str, n_options: int) -> Decision:
  """Parses the last `DECISION: (s1, s2[, s3])` line; never raises."""
  try:
    if not isinstance(text, str):
      return _fail("not_text", f"got {type(text).__name__}")
    if isinstance(n_options, bool) or not isinstance(n_options, (int, np.integer)) or n_options < 1:
      return _fail("bad_n_options", repr(n_options))
    clean = _strip_markdown(text)
    at = clean.rfind(DECISION_TAG)
    if at < 0:
      return _fail("no_decision_line", f"no {DECISION_TAG!r} (case-sensitive) in the text")
    line = clean[at + len(DECISION_TAG):].split("\n", 1)[0].strip()
    return _parse_scores(line, int(n_options))
  except Exception as e:  # noqa: BLE001  a reward must never crash a rollout
    return _fail("internal", f"{type(e).__name__}: {e}")


# ----------------------------------------------------------------------------- registry

RewardFn = Callable[[Sequence[str], Sequence[int], Sequence[int]], np.ndarray]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str, *, overwrite: bool = False):
  """Decorator: `@register_reward("mine")` makes `fn` available to configs by name."""
  def deco(fn: RewardFn) -> RewardFn:
    if name in REWARDS and not overwrite:
      raise ValueError(f"reward {name!r} is already registered (pass overwrite=True)")
    REWARDS[name] = fn
    return fn
  return deco


def get_reward(name: str) -> RewardFn:
  if name not in REWARDS:
    raise KeyError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}")
  return REWARDS[name]


def _parse_all(completions, labels, n_options) -> list[Decision]:
  """Parses every completion after checking the three lists agree."""
  if not (len(completions) == len(labels) == len(n_options)):
    raise ValueError(
        f"completions ({len(completions)}), labels ({len(labels)}) and n_options "
        f"({len(n_options)}) must have the same length")
  for i, (y, k) in enumerate(zip(labels, n_options)):
    if not 0 <= int(y) < int(k):
      raise ValueError(f"completion {i}: label {y} is outside [0, {k})")
  return [parse_decision(c, int(k)) for c, k in zip(completions, n_options)]


@register_reward("correctness")
def correctness(completions, labels, n_options) -> np.ndarray:
  """1 when the parsed choice is the true option, else 0 (parse failure: 0)."""
  ds = _parse_all(completions, labels, n_options)
  return np.asarray([float(d.ok and d.choice == int(y)) for d, y in zip(ds, labels)],
                    dtype=np.float32)


@register_reward("log_prob")
def log_prob(completions, labels, n_options) -> np.ndarray:
  """log p(true option), floored at log(LOG_PROB_EPS); parse failure gets the floor."""
  ds = _parse_all(completions, labels, n_options)
  out = [math.log(max(float(d.probs[int(y)]), LOG_PROB_EPS)) if d.ok else LOG_PROB_FLOOR
         for d, y in zip(ds, labels)]
  return np.asarray(out, dtype=np.float32)


@register_reward("brier")
def brier(completions, labels, n_options) -> np.ndarray:
  """Negative multi-class Brier score -sum_i (p_i - y_i)^2; parse failure: -2 (worst)."""
  ds = _parse_all(completions, labels, n_options)
  out = []
  for d, y in zip(ds, labels):
    if not d.ok:
      out.append(BRIER_FLOOR)
      continue
    onehot = np.zeros_like(d.probs)
    onehot[int(y)] = 1.0
    out.append(-float(np.sum((d.probs - onehot) ** 2)))
  return np.asarray(out, dtype=np.float32)


@register_reward("format")
def format_reward(completions, labels, n_options) -> np.ndarray:
  """1 when the DECISION line parses with the right number of scores, else 0."""
  ds = _parse_all(completions, labels, n_options)
  return np.asarray([float(d.ok) for d in ds], dtype=np.float32)


def combined_reward(completions, labels, n_options, weights: dict[str, float]):
  """Weighted sum of registered rewards.

  Returns (total [N] float32, {name: [N] float32 unweighted}, format_ok [N] bool).
  """
  if not weights:
    raise ValueError("weights is empty: name at least one reward")
  ds = _parse_all(completions, labels, n_options)
  per_name = {name: np.asarray(get_reward(name)(completions, labels, n_options),
                               dtype=np.float32) for name in weights}
  total = np.zeros(len(completions), dtype=np.float32)
  for name, w in weights.items():
    if per_name[name].shape != total.shape:
      raise ValueError(f"reward {name!r} returned shape {per_name[name].shape}, "
                       f"expected {total.shape}")
    total += np.float32(w) * per_name[name]
  format_ok = np.asarray([d.ok for d in ds], dtype=bool)
  return total, per_name, format_ok
