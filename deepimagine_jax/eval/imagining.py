"""Successive imagining: walk from anchors with known results to the target, one factor at a time.

For a target question, each of up to k chain examples (data_pipeline.pairs.build_chains:
`anchor` with its observed `label`, `factors` = the one-factor steps in order)
is walked step by step: the current result starts as the anchor's observed answer;
at step d the model is asked (templates.render_chain_step) how the result reads
after the d-th change, and its argmax option sentence becomes the current result
of step d + 1. The last step's option distribution is that anchor's prediction;
the k predictions are combined by the mean of probabilities or the normalised
geometric mean. Every step of every chain at the same depth is scored in one
batched call (scoring.option_probs_by_scoring), so the number of calls is the
longest chain, not the number of targets. Targets without a chain fall back to
the direct answer and are counted.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from data_pipeline import templates
from data_pipeline.example import Example
from deepimagine_jax.eval import metrics, scoring
from deepimagine_jax.eval.report import Trajectory

AGGREGATES = ("mean", "geometric")
EPS = metrics.EPS


def chain_target_id(chain: Example) -> str:
  """The target question id of a chain example ('chain:<anchor id>-><target id>')."""
  if not chain.id.startswith("chain:") or "->" not in chain.id:
    raise ValueError(f"chain example {chain.id!r}: field 'id' is not 'chain:<anchor>-><target>'")
  return chain.id.split("->", 1)[1]


def aggregate(anchor_probs: np.ndarray, how: str) -> np.ndarray:
  """Combines the rows of [k, n_options]: their mean, or normalised geometric mean."""
  p = np.asarray(anchor_probs, np.float64)
  if p.ndim != 2 or p.shape[0] == 0:
    raise ValueError(f"need a non-empty [k, n_options] array, got shape {p.shape}")
  if how == "mean":
    out = p.mean(axis=0)
  elif how == "geometric":
    out = np.exp(np.log(np.clip(p, EPS, 1.0)).mean(axis=0))
  else:
    raise ValueError(f"aggregate must be one of {AGGREGATES}, got {how!r}")
  return out / out.sum()


def select_chains(targets: Sequence[Example], chains: Sequence[Example], k: int,
                  exclude_anchor_ids: frozenset | set = frozenset(),
                  exclude_anchor_trials: frozenset | set = frozenset()):
  """target index -> up to k chains (input order), plus counts of what was left out.

  A chain whose anchor is one of the targets or in exclude_anchor_ids (pass
  every evaluation question) is dropped: its "known" result would be an
  evaluation label; so is one whose anchor trial is in exclude_anchor_trials
  (pass the evaluation trials). Chains without steps or with option lists unlike the
  target's are dropped too.
  """
  index = {t.id: i for i, t in enumerate(targets)}
  banned = set(index) | set(exclude_anchor_ids)
  chosen: dict[int, list] = {}
  skipped = {"anchor_is_target": 0, "no_steps": 0, "options_differ": 0, "over_k": 0}
  for ch in chains:
    i = index.get(chain_target_id(ch))
    if i is None:
      continue
    if ch.anchor.id in banned or ch.anchor.trial_id in exclude_anchor_trials:
      skipped["anchor_is_target"] += 1
    elif not ch.factors:
      skipped["no_steps"] += 1
    elif tuple(ch.options) != tuple(targets[i].options):
      skipped["options_differ"] += 1
    elif len(chosen.get(i, ())) >= k:
      skipped["over_k"] += 1
    else:
      chosen.setdefault(i, []).append(ch)
  return chosen, skipped


def imagine(graphdef, params, tokenizer, targets: Sequence[Example], chains: Sequence[Example],
            *, k: int, how: str, prompt_len: int, batch_size: int,
            direct_probs: np.ndarray | None = None,
            exclude_anchor_ids: frozenset | set = frozenset(),
            exclude_anchor_trials: frozenset | set = frozenset()):
  """(probs [Q, O], step trajectories, stats) for the targets.

  direct_probs [Q, O]: the direct answers used for targets without a chain
  (computed here by scoring when None). stats counts targets imagined / fallen
  back, chains walked, scoring calls, steps scored and chains left out.
  exclude_anchor_ids / exclude_anchor_trials: anchors never to use (select_chains).
  """
  if how not in AGGREGATES:
    raise ValueError(f"aggregate must be one of {AGGREGATES}, got {how!r}")
  if k < 1:
    raise ValueError(f"imagining_k must be >= 1, got {k}")
  chosen, skipped = select_chains(targets, chains, k, exclude_anchor_ids,
                                  exclude_anchor_trials)
  walks = [(i, ch) for i in sorted(chosen) for ch in chosen[i]]
  current = [ch.anchor.answer for _, ch in walks]
  final = [None] * len(walks)
  trajectories = []
  depth, calls, steps = 0, 0, 0
  while True:
    live = [w for w, (_, ch) in enumerate(walks) if depth < len(ch.factors)]
    if not live:
      break
    step_examples = []
    for w in live:
      ch = walks[w][1]
      prompt, _ = templates.render_chain_step(ch, depth, current[w])
      step_examples.append(ch.replace(id=f"{ch.id}#step{depth}", prompt=prompt))
    step_probs = scoring.option_probs_by_scoring(graphdef, params, tokenizer, step_examples,
                                                 prompt_len=prompt_len, batch_size=batch_size)
    calls += 1
    steps += len(live)
    for w, step, p3 in zip(live, step_examples, step_probs):
      i, ch = walks[w]
      p = p3[:ch.n_options]
      choice = metrics.choose(p)
      last = depth == len(ch.factors) - 1
      trajectories.append(Trajectory.chosen(
          targets[i].replace(prompt=step.prompt), p, "imagining", chain_id=ch.id, step=depth,
          n_steps=len(ch.factors), final=last, factor=ch.factors[depth].factor,
          current_result=current[w]))
      current[w] = ch.options[choice]
      if last:
        final[w] = p
    depth += 1

  out = np.zeros((len(targets), scoring.MAX_OPTIONS), np.float64)
  fallback = [i for i in range(len(targets)) if i not in chosen]
  if fallback:
    if direct_probs is None:
      fallback_probs = scoring.option_probs_by_scoring(
          graphdef, params, tokenizer, [targets[i] for i in fallback],
          prompt_len=prompt_len, batch_size=batch_size)
    else:
      fallback_probs = np.asarray(direct_probs, np.float64)[fallback]
    out[fallback] = fallback_probs
  for i in chosen:
    n = targets[i].n_options
    out[i, :n] = aggregate(np.stack([final[w] for w, (j, _) in enumerate(walks) if j == i]), how)
  stats = {"targets": len(targets), "imagined": len(chosen), "fallback": len(fallback),
           "chains": len(walks), "scoring_calls": calls, "steps": steps,
           "skipped": skipped}
  return out, trajectories, stats
