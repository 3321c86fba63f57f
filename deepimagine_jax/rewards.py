"""Verifiable rewards: the one DECISION-line parser and registered reward functions.

The parser applies the CT Open benchmark's published rules (its
`evaluations/evaluation.py`): remove `*`, `#` and code fences; take the text after
the LAST case-sensitive `DECISION:`, strip it, keep its first line; read that line,
up to its first `)`, as a Python literal (`ast.literal_eval`, which runs no code);
normalise the scores, clip each at 1e-12 and renormalise; the choice is the argmax
(ties: lowest index, as `np.argmax`). So `DECISION:\\n(0.7, 0.3)`, `(0.7, 0.3)
because ...`, `(1, 0,)` and `(1, 0` read as the benchmark reads them.

Where the benchmark would crash, score NaN or read nonsense, this parser refuses
instead (a counted `Decision.error_code`, never option 0):
  * no `DECISION:` at all (the benchmark would parse the whole text's first line);
  * not exactly one score per option (fewer crash the benchmark, more it scores);
  * a score that is not a real number: strings, None, complex, nested tuples, and
    booleans (the benchmark would read True as 1);
  * negative scores (the benchmark divides by a sum that may be zero or negative);
  * inf, nan, or a sum that overflows (NaN or silently uniform probabilities);
  * all-zero scores (0/0: NaN probabilities whose argmax is option 0).
On every output it accepts, probs and choice equal the benchmark's bit for bit.

Rewards are paid in the class-balanced measure of the RL prompts (`ClassBalance`):
the benchmark's accuracy is class-balanced, and a reward that paid for the base
rate would teach a policy to answer the majority option.
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import logging
import math
from typing import Callable, Mapping, Sequence

import numpy as np

DECISION_TAG = "DECISION:"
# The benchmark's probability floor (np.clip(probs, 1e-12, 1.0), max(p, 1e-12) in its CE).
PROB_FLOOR = 1e-12
LOG_PROB_FLOOR = math.log(PROB_FLOOR)
# Worst multi-class Brier score (all mass on one wrong option); paid on a parse failure.
BRIER_FLOOR = -2.0

# Stable error codes (the part of `Decision.error` before ':'), for counting.
ERROR_CODES = (
    "not_text", "bad_n_options", "no_decision_line", "not_a_tuple", "wrong_count",
    "non_numeric", "negative", "non_finite", "all_zero", "internal",
)


@dataclasses.dataclass(frozen=True)
class Decision:
  """A parsed DECISION line; `error` is '' when ok, else 'code: detail'."""
  ok: bool
  probs: np.ndarray | None = None  # float64 [n_options], sums to 1, each >= 1e-12
  choice: int | None = None  # argmax, lowest index on a tie (the benchmark's reading)
  error: str = ""

  @property
  def error_code(self) -> str:
    return self.error.split(":", 1)[0]

  @property
  def tie(self) -> bool:
    """More than one option holds the top probability: a guess, not an answer."""
    return self.ok and int(np.sum(self.probs == self.probs[self.choice])) > 1


def _fail(code: str, detail: str) -> Decision:
  return Decision(ok=False, error=f"{code}: {detail}")


def _strip_markdown(text: str) -> str:
  """The benchmark's own cleanup, so '**DECISION:** (1, 0)' reads the same."""
  for token in ("*", "#", "```python", "```"):
    text = text.replace(token, "")
  return text


def _check_score(i: int, x) -> str:
  """'' when x is a usable score, else the failure 'code: detail'."""
  if isinstance(x, bool) or not isinstance(x, (int, float)):
    return f"non_numeric: score {i} is {x!r:.40}"
  try:
    value = float(x)
  except OverflowError:  # an int too large for a float
    return f"non_finite: score {i} does not fit a float"
  if not math.isfinite(value):
    return f"non_finite: score {i} is {value}"
  if value < 0:
    return f"negative: score {i} is {x!r}"
  return ""


def _read_scores(line: str, n_options: int) -> Decision:
  try:
    value = ast.literal_eval(line.split(")")[0] + ")")
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
    return _fail("not_a_tuple", f"{line[:60]!r} is not a tuple of numbers ({type(e).__name__})")
  if not isinstance(value, tuple):  # "(0.7)" is a bare number
    return _fail("wrong_count", f"expected {n_options} scores, got one bare value")
  if len(value) != n_options:
    return _fail("wrong_count", f"expected {n_options} scores, got {len(value)}")
  scores = value
  for i, x in enumerate(scores):
    problem = _check_score(i, x)
    if problem:
      return Decision(ok=False, error=problem)
  raw = np.array(scores, dtype=np.float64)
  with np.errstate(over="ignore"):
    total = raw.sum()
  if total == 0.0:
    return _fail("all_zero", "scores cannot be normalised")
  if not math.isfinite(total):
    return _fail("non_finite", "the scores' sum overflows")
  probs = raw / total
  probs = np.clip(probs, PROB_FLOOR, 1.0)
  probs = probs / probs.sum()
  probs.setflags(write=False)
  return Decision(ok=True, probs=probs, choice=int(np.argmax(probs)))


def parse_decision(text: str, n_options: int) -> Decision:
  """Reads the last `DECISION:` by the benchmark's rules (module docstring); never raises."""
  try:
    if not isinstance(text, str):
      return _fail("not_text", f"got {type(text).__name__}")
    if isinstance(n_options, bool) or not isinstance(n_options, (int, np.integer)) or n_options < 1:
      return _fail("bad_n_options", repr(n_options))
    clean = _strip_markdown(text)
    if DECISION_TAG not in clean:
      return _fail("no_decision_line", f"no {DECISION_TAG!r} (case-sensitive) in the text")
    line = clean.split(DECISION_TAG)[-1].strip().split("\n")[0].strip()
    return _read_scores(line, int(n_options))
  except Exception as e:  # noqa: BLE001  a reward must never crash a rollout
    return _fail("internal", f"{type(e).__name__}: {e}")


# ----------------------------------------------------------------------------- class balance

@dataclasses.dataclass(frozen=True)
class ClassBalance:
  """Weight of each (n_options, label): 1 / (n_options * frequency of label among them).

  Under these weights the expected reward of any label-blind answer equals what
  it earns when every class is equally frequent: a constant answer's correctness
  is 1 / n_options (chance), and the best constant distribution under a proper
  score is the uniform one. Frequencies come from the RL prompts (`of`).
  """
  weights: tuple[tuple[tuple[int, int], float], ...]  # ((n_options, label), weight)

  @classmethod
  def of(cls, labels: Sequence[int], n_options: Sequence[int]) -> "ClassBalance":
    """From the labels of the prompts RL draws from (every prompt counted once)."""
    if len(labels) != len(n_options) or not len(labels):
      raise ValueError(f"ClassBalance.of: need as many labels ({len(labels)}) as n_options "
                       f"({len(n_options)}), at least one")
    for y, n in zip(labels, n_options):
      if not 0 <= int(y) < int(n):
        raise ValueError(f"ClassBalance.of: label {y} is outside [0, {n})")
    counts = collections.Counter((int(n), int(y)) for y, n in zip(labels, n_options))
    per_n = collections.Counter(int(n) for n in n_options)
    for n in sorted(per_n):
      missing = [y for y in range(n) if (n, y) not in counts]
      if missing:  # then a constant answer on a present class beats uniform guessing
        logging.warning("ClassBalance: %d-option prompts have no label %s; a constant answer "
                        "still earns 1/%d, uniform guessing less", n, missing, n)
    return cls(tuple(sorted(((n, y), per_n[n] / (n * c)) for (n, y), c in counts.items())))

  def weight_of(self, labels: Sequence[int], n_options: Sequence[int]) -> np.ndarray:
    """float64 [N] weights; a (n_options, label) the prompts never had is an error."""
    table = dict(self.weights)
    out = np.empty(len(labels), np.float64)
    for i, (y, n) in enumerate(zip(labels, n_options)):
      key = (int(n), int(y))
      if key not in table:
        raise ValueError(f"ClassBalance: no weight for label {y} of {n} options (the balance "
                         f"was built from other prompts: {sorted(table)})")
      out[i] = table[key]
    return out


# ----------------------------------------------------------------------------- graded answers

@dataclasses.dataclass(frozen=True)
class Answers:
  """One rollout's completions, each parsed once, with what every reward needs."""
  texts: tuple[str, ...]
  decisions: tuple[Decision, ...]
  labels: np.ndarray         # int64 [N]
  n_options: np.ndarray      # int64 [N]
  label_weights: np.ndarray  # float64 [N], ClassBalance weight of each label

  @property
  def ok(self) -> np.ndarray:
    return np.asarray([d.ok for d in self.decisions], bool)

  @property
  def answered(self) -> np.ndarray:
    """Parsed and not a tie: the only outputs that can be right."""
    return np.asarray([d.ok and not d.tie for d in self.decisions], bool)

  @property
  def right(self) -> np.ndarray:
    return self.answered & np.asarray([d.choice == y if d.ok else False
                                       for d, y in zip(self.decisions, self.labels)], bool)


def grade(texts: Sequence[str], labels: Sequence[int], n_options: Sequence[int],
          balance: ClassBalance) -> Answers:
  """Parses every completion after checking the three lists agree."""
  if not (len(texts) == len(labels) == len(n_options)):
    raise ValueError(f"completions ({len(texts)}), labels ({len(labels)}) and n_options "
                     f"({len(n_options)}) must have the same length")
  for i, (y, k) in enumerate(zip(labels, n_options)):
    if not 0 <= int(y) < int(k):
      raise ValueError(f"completion {i}: label {y} is outside [0, {k})")
  return Answers(texts=tuple(texts),
                 decisions=tuple(parse_decision(t, int(k)) for t, k in zip(texts, n_options)),
                 labels=np.asarray(labels, np.int64), n_options=np.asarray(n_options, np.int64),
                 label_weights=balance.weight_of(labels, n_options))


# ----------------------------------------------------------------------------- registry

RewardFn = Callable[[Answers], np.ndarray]  # -> float32 [N]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str, *, overwrite: bool = False):
  """Decorator: `@register_reward("mine")` makes `fn(answers)` available to configs by name."""
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


@register_reward("correctness")
def correctness(a: Answers) -> np.ndarray:
  """Class weight when the choice is the true option; 0 on a tie or a parse failure."""
  return (a.label_weights * a.right).astype(np.float32)


@register_reward("log_prob")
def log_prob(a: Answers) -> np.ndarray:
  """Class weight x log p(true option) (>= log 1e-12, the benchmark's floor); failure: the floor."""
  out = [math.log(max(float(d.probs[y]), PROB_FLOOR)) if d.ok else LOG_PROB_FLOOR
         for d, y in zip(a.decisions, a.labels)]
  return (a.label_weights * np.asarray(out)).astype(np.float32)


@register_reward("brier")
def brier(a: Answers) -> np.ndarray:
  """Class weight x negative Brier score -sum_i (p_i - y_i)^2; failure: -2 (the worst)."""
  out = []
  for d, y in zip(a.decisions, a.labels):
    if not d.ok:
      out.append(BRIER_FLOOR)
      continue
    onehot = np.zeros_like(d.probs)
    onehot[y] = 1.0
    out.append(-float(np.sum((d.probs - onehot) ** 2)))
  return (a.label_weights * np.asarray(out)).astype(np.float32)


@register_reward("format")
def format_reward(a: Answers) -> np.ndarray:
  """1 when the DECISION line parses with one score per option (label-blind: unweighted)."""
  return a.ok.astype(np.float32)


def combined_reward(answers: Answers, weights: Mapping[str, float]):
  """Weighted sum of registered rewards: (total [N] float32, {name: [N] float32 unweighted})."""
  if not weights:
    raise ValueError("weights is empty: name at least one reward")
  n = len(answers.texts)
  per_name = {name: np.asarray(get_reward(name)(answers), np.float32) for name in weights}
  total = np.zeros(n, np.float32)
  for name, w in weights.items():
    if per_name[name].shape != (n,):
      raise ValueError(f"reward {name!r} returned shape {per_name[name].shape}, expected ({n},)")
    total += np.float32(w) * per_name[name]
  return total, per_name
