"""Imagined intermediate results: training examples of the factors no trial varies inside itself.

Natural pairs change a dose, a comparator or an outcome inside one trial. The
trial-level factors (population, condition, design, geography, size) change only
between trials, so a walk from a retrieved anchor to its target (a `chain`,
pairs.cross_trial_pairs) passes through trials nobody ran. For each chain with an
intermediate step of a configured factor, the teacher is asked, step by step up
to the last such step, for the result after the step and its reasoning
(templates.render_imagine_request); the option it picks is the next step's result
so far. Steps of other factors on the way are asked too (the walk needs their
result) and kept as examples of their own factor. The last step lands on the
target, whose result is observed: never asked.

An answer is kept when its DECISION line parses by the benchmark's rules
(traces.split_answer), picks one option (no tie) and is a distribution: every
number in [0, 1], the sum within SUM_TOLERANCE of 1. A kept answer becomes one
`imagined_step` Example (the chain-step prompt the policy sees when it imagines,
templates.render_chain_step; completion the teacher's DECISION line; label its
choice) and one trace row; a rejected one ends its walk. Counts per factor:
asked, valid, rejected by reason. SFT reads both files (sft.imagined, sft.traces).
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import json
import logging
import os
from typing import Callable, Sequence

from data_pipeline import io, templates
from data_pipeline.example import Example
from data_pipeline.facts import FACTORS
from deepimagine_jax import rewards, teacher, traces
from deepimagine_jax.serve_config import TeacherConfig

KIND = "imagined_step"
TRAINING_SPLITS = ("train", "rl")  # never dev / eval: their targets are held out
SUM_TOLERANCE = 0.02
EXAMPLES_FILE, TRACES_FILE, REPORT_FILE = "imagined.jsonl", "imagined_traces.jsonl", \
    "imagined_report.json"


@dataclasses.dataclass(frozen=True)
class ImagineConfig:
  """`config.imagine` (configs/traces.py:imagine): which steps the teacher imagines."""
  factors: tuple[str, ...]  # a chain is walked up to its last intermediate step of these
  splits: tuple[str, ...]  # the chains' splits (training splits only)
  max_walks: int  # chains walked, in file order (0 = all)

  def __post_init__(self):
    if not isinstance(self.factors, tuple) or not self.factors or set(self.factors) - set(FACTORS):
      raise ValueError(f"imagine.factors must be a non-empty tuple of {FACTORS}, got "
                       f"{self.factors!r}")
    if not isinstance(self.splits, tuple) or not self.splits or (set(self.splits)
                                                                  - set(TRAINING_SPLITS)):
      raise ValueError(f"imagine.splits must be a non-empty tuple of {TRAINING_SPLITS} (dev and "
                       f"eval targets are held out), got {self.splits!r}")
    if self.max_walks < 0:
      raise ValueError(f"imagine.max_walks must be >= 0 (0 = all), got {self.max_walks}")


def raw_scores(text: str) -> tuple:
  """The numbers of the last DECISION line as written (before the parser normalises them);
  only for text parse_decision accepted."""
  line = text.replace("*", "").replace("#", "").split(rewards.DECISION_TAG)[-1]
  return ast.literal_eval(line.strip().split("\n")[0].split(")")[0] + ")")


def check_answer(text: str, n_options: int) -> traces.Trace | str:
  """The trace of a teacher's imagined result, or why it is rejected."""
  t = traces.split_answer(text, n_options)
  if isinstance(t, str):
    return t
  if rewards.parse_decision(text, n_options).tie:
    return "tie"
  scores = raw_scores(text)
  if any(not 0 <= x <= 1 for x in scores):
    return "out_of_range"
  if abs(sum(scores) - 1) > SUM_TOLERANCE:
    return "not_a_distribution"
  return t


def walkable(chain: Example, factors: Sequence[str]) -> int:
  """How many steps of `chain` the teacher imagines: up to its last intermediate step (the
  last step excluded: it lands on the target) whose factor is in `factors`; 0 if none."""
  steps = [f.factor for f in chain.factors[:-1]]
  return max((i + 1 for i, f in enumerate(steps) if f in factors), default=0)


def step_example(chain: Example, step: int, prompt: str, t: traces.Trace) -> Example:
  """The training example of one imagined step: its factor, the teacher's choice as label."""
  return chain.replace(id=f"{KIND}:{step}:{chain.id}", kind=KIND, prompt=prompt,
                       completion=t.decision, label=t.choice,
                       perturbation=chain.factors[step].factor)


def _counts() -> dict:
  return {"asked": 0, "valid": 0, "rejected": collections.Counter()}


def imagine(cfg: TeacherConfig, chains: Sequence[Example], factors: Sequence[str],
            cache_path: str, *, n_tokens: Callable[[str], int], max_tokens: int,
            progress: bool = True) -> tuple[list[Example], list[dict], dict]:
  """(imagined_step Examples, their trace rows, counts) for the walkable steps of `chains`.

  One teacher round per depth (every walk's step d together); answers are cached
  (teacher.ask_all), so a re-run sends nothing twice. A step whose training prompt
  cannot fit `max_tokens` is counted, not asked, and ends its walk.
  """
  per_factor = collections.defaultdict(_counts)
  sent = collections.Counter()
  out, rows = [], []
  active = [(c, c.anchor.answer) for c in chains if walkable(c, factors)]
  depth = 0
  while active:
    asks = []
    for chain, current in active:
      counts = per_factor[chain.factors[depth].factor]
      counts["asked"] += 1
      try:
        prompt, _ = templates.render_chain_step(chain, depth, current, n_tokens=n_tokens,
                                                max_tokens=max_tokens)
      except templates.PromptTooLong:
        counts["rejected"]["prompt_too_long"] += 1
        continue
      asks.append((chain, current, prompt))
    messages = [[{"role": "user", "content": templates.render_imagine_request(c, depth, cur)}]
                for c, cur, _ in asks]
    answers, round_counts = teacher.ask_all(cfg, messages, cache_path, progress=progress)
    sent.update({k: v for k, v in round_counts.items() if isinstance(v, int)})
    active = []
    for (chain, _, prompt), a in zip(asks, answers):
      counts = per_factor[chain.factors[depth].factor]
      t = "no_answer" if a is None else check_answer(a.content, chain.n_options)
      if isinstance(t, str):
        counts["rejected"][t] += 1
        continue
      counts["valid"] += 1
      ex = step_example(chain, depth, prompt, t)
      out.append(ex)
      rows.append(traces.row(ex.id, t, a.model, a.created))
      if depth + 1 < walkable(chain, factors):
        active.append((chain, chain.options[t.choice]))
    depth += 1
  report = {"chains": len(chains), "walked": sum(walkable(c, factors) > 0 for c in chains),
            "examples": len(out), "teacher": dict(sent),
            "per_factor": {f: {**c, "rejected": dict(c["rejected"])}
                           for f, c in sorted(per_factor.items())}}
  return out, rows, report


def imagine_job(config, workdir: str) -> dict:
  """configs/traces.py:imagine: imagined steps of the build's training chains, written to
  <workdir>/imagined.jsonl, imagined_traces.jsonl and imagined_report.json."""
  from deepimagine_jax import jobs  # jobs imports traces: imported at call time
  from deepimagine_jax.config import RunConfig
  from deepimagine_jax.serve_config import typed
  run = RunConfig.from_config(config)
  cfg = typed(ImagineConfig, config.imagine)
  built, tokenizer = jobs.prepare_data(run, workdir)
  chains = [ex for split in cfg.splits for ex in built.examples(split, ("chain",))]
  if cfg.max_walks:
    chains = [c for c in chains if walkable(c, cfg.factors)][:cfg.max_walks]
  examples, rows, report = imagine(
      typed(TeacherConfig, config.teacher), chains, cfg.factors,
      os.path.join(workdir, "teacher_cache.jsonl"),
      n_tokens=lambda s: len(tokenizer.encode(s)), max_tokens=run.data.prompt_len - 1)
  io.write_jsonl(os.path.join(workdir, EXAMPLES_FILE), [ex.to_json() for ex in examples])
  io.write_jsonl(os.path.join(workdir, TRACES_FILE), rows)
  io.write_json(os.path.join(workdir, REPORT_FILE), report)
  logging.info("%d imagined steps written to %s", len(examples), workdir)
  print(json.dumps(report, indent=1))
  return report
