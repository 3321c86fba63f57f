"""Stepwise imagining: walk from each retrieved anchor to the target, one factor at a time.

Every target question has up to data.anchors_k cross-trial records from the build
(pairs.cross_trial_pairs, id '<kind>:<anchor id>-><target id>'): an
`approximate_pair` (one differing factor, or none known) or a `chain` (two or
more), its `anchor` holding the observed answer and its `factors` the steps in
the configured walk order. Imagining takes the k nearest (by `similarity`) and
walks each: the current result starts as the anchor's observed answer; at step d
the model is asked (templates.render_chain_step) how the result reads after the
d-th change, and the option it chooses becomes the result given at step d + 1.
A record with no known differing factor is one call on its own pair prompt
(anchor result, "no known factor differs", the target). The last call's option
distribution is that anchor's decision; the k decisions are combined by the mean
or normalised geometric mean of probabilities.

Every prompt of every walk at the same depth is scored in one batched call
(scoring.option_probs_by_scoring: the one shared-prefix forward), so the calls
are the longest walk, not the targets. Every prompt is fitted to `prompt_len`
tokens of the policy's tokenizer (nothing is cut downstream); a walk whose step
cannot fit is ended and counted. A target with no usable anchor (or no finished
walk) has no answer (a NaN row) unless `direct_probs` is given, and is counted
either way: there is no silent fallback.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import numpy as np

from data_pipeline import templates
from data_pipeline.example import Example
from deepimagine_jax import lora
from deepimagine_jax.eval import metrics, scoring
from deepimagine_jax.eval.report import Trajectory

AGGREGATES = ("mean", "geometric")
WALK_KINDS = ("approximate_pair", "chain")  # the cross-trial records imagining walks
EPS = metrics.EPS


def chain_target_id(pair: Example) -> str:
  """The target question id of a cross-trial record ('<kind>:<anchor id>-><target id>')."""
  kind, _, rest = pair.id.partition(":")
  head = f"{pair.anchor.id}->" if pair.anchor is not None else None
  if kind not in WALK_KINDS or head is None or not rest.startswith(head):
    raise ValueError(f"example {pair.id!r}: field 'id' is not '<kind>:<anchor id>-><target id>' "
                     f"with kind in {WALK_KINDS} and the record's anchor id")
  return rest[len(head):]


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


def select_anchors(targets: Sequence[Example], pairs: Sequence[Example], k: int,
                   exclude_anchor_ids: frozenset | set = frozenset(),
                   exclude_anchor_trials: frozenset | set = frozenset()):
  """(target index -> its up to k nearest records, counts of what was left out).

  Records of other kinds and of other targets are ignored. A record whose anchor
  is one of the targets or in exclude_anchor_ids (pass every evaluation question)
  is dropped: its "known" result would be an evaluation label; so is one whose
  anchor trial is in exclude_anchor_trials (pass the evaluation trials), and one
  whose options differ from its target's. Nearest: highest `similarity` first,
  the input order among equals.
  """
  index = {t.id: i for i, t in enumerate(targets)}
  banned = set(index) | set(exclude_anchor_ids)
  usable: dict[int, list] = collections.defaultdict(list)
  skipped = collections.Counter()
  for ex in pairs:
    if ex.kind not in WALK_KINDS:
      continue
    i = index.get(chain_target_id(ex))
    if i is None:
      continue
    if ex.anchor.id in banned or ex.anchor.trial_id in exclude_anchor_trials:
      skipped["anchor_is_eval"] += 1
    elif tuple(ex.options) != tuple(targets[i].options):
      skipped["options_differ"] += 1
    else:
      usable[i].append(ex)
  chosen = {}
  for i, exs in sorted(usable.items()):
    exs = sorted(exs, key=lambda ex: -np.inf if ex.similarity is None else -ex.similarity)
    chosen[i] = exs[:k]
    skipped["over_k"] += len(exs) - len(chosen[i])
  return chosen, {key: skipped[key] for key in ("anchor_is_eval", "options_differ", "over_k")}


@dataclasses.dataclass
class _Walk:
  target: int  # index into the targets
  pair: Example
  current: str  # the result given to the next step
  steps: list  # one dict per call made
  probs: np.ndarray | None = None  # the final decision
  failed: str = ""

  @property
  def n_calls(self) -> int:
    return max(len(self.pair.factors), 1)  # no known factor: one call on the pair prompt


def prompt_tokens_counter(tokenizer):
  """n_tokens(prompt): the tokens scoring places in the prompt window (chat head included)."""
  return lambda text: sum(len(ids) for ids in tokenizer.prompt_ids(text))


def step_prompt(pair: Example, depth: int, current: str, n_tokens, prompt_len: int) -> str:
  """The prompt of call `depth` of a walk, at most prompt_len tokens (PromptTooLong if not)."""
  if not pair.factors:
    return templates.fit_to_tokens(templates.render(pair), n_tokens, prompt_len).prompt
  prompt, _ = templates.render_chain_step(pair, depth, current, n_tokens=n_tokens,
                                          max_tokens=prompt_len)
  return prompt


def _walk_json(w: _Walk) -> dict:
  a = w.pair.anchor
  return {"pair_id": w.pair.id, "kind": w.pair.kind, "anchor_id": a.id,
          "anchor_trial_id": a.trial_id, "anchor_title": a.title,
          "anchor_endpoint": a.endpoint, "anchor_result": a.answer,
          "similarity": w.pair.similarity, "unknown_factors": list(w.pair.unknown_factors),
          "steps": w.steps, "failed": w.failed,
          "probs": None if w.probs is None else [float(x) for x in w.probs]}


def imagine(graphdef, params, tokenizer, targets: Sequence[Example], pairs: Sequence[Example],
            *, k: int, how: str, prompt_len: int, batch_size: int,
            direct_probs: np.ndarray | None = None,
            exclude_anchor_ids: frozenset | set = frozenset(),
            exclude_anchor_trials: frozenset | set = frozenset()):
  """(probs [Q, O], one trajectory per target, stats).

  probs row q: target q's aggregated anchor decisions (0 past its n_options);
  NaN where it has no answer: no usable anchor and no finished walk, unless
  direct_probs [Q, O] is given, whose row is then used (counted as `fallback`).
  Each trajectory holds the final answer and, in details["walks"], every
  anchor's walk: its observed result, each step's change, the result given,
  the probabilities and the estimate chosen. stats: targets, imagined (answered
  through anchors), fallback, missing, coverage (imagined / targets), anchors per target,
  walks by steps, failed walks by reason, scoring calls and prompts scored, and
  the records left out (select_anchors).
  """
  if how not in AGGREGATES:
    raise ValueError(f"eval.aggregate must be one of {AGGREGATES}, got {how!r}")
  if k < 1:
    raise ValueError(f"eval.imagining_k must be >= 1, got {k}")
  if direct_probs is not None and np.shape(direct_probs) != (len(targets), scoring.MAX_OPTIONS):
    raise ValueError(f"direct_probs of shape {np.shape(direct_probs)} for {len(targets)} targets")
  chosen, skipped = select_anchors(targets, pairs, k, exclude_anchor_ids, exclude_anchor_trials)
  walks = [_Walk(i, ex, ex.anchor.answer, []) for i in sorted(chosen) for ex in chosen[i]]
  n_tokens = prompt_tokens_counter(tokenizer)
  failed = collections.Counter()
  depth, calls, prompts_scored = 0, 0, 0
  routed = lora.routed_config(graphdef, params)  # each step by its factor's local operator
  while True:
    live, examples = [], []
    for w in walks:
      if w.failed or depth >= w.n_calls:
        continue
      try:
        prompt = step_prompt(w.pair, depth, w.current, n_tokens, prompt_len)
      except templates.PromptTooLong:
        w.failed = "prompt_too_long"
        failed[w.failed] += 1
        continue
      live.append(w)
      examples.append(w.pair.replace(id=f"{w.pair.id}#step{depth}", prompt=prompt))
    if not live:
      break
    adapters = None if routed is None else [
        lora.route(routed, w.pair.factors[depth].factor if w.pair.factors else "")
        for w in live]
    step_probs = scoring.option_probs_by_scoring(graphdef, params, tokenizer, examples,
                                                 adapters=adapters,
                                                 prompt_len=prompt_len, batch_size=batch_size)
    calls += 1
    prompts_scored += len(live)
    for j, (w, ex, p3) in enumerate(zip(live, examples, step_probs)):
      p = p3[:ex.n_options]
      estimate = ex.options[metrics.choose(p)]
      factor = w.pair.factors[depth] if w.pair.factors else None
      w.steps.append({"step": depth, "factor": factor.factor if factor else "",
                      "adapter": "" if routed is None else routed.adapters[adapters[j]],
                      "from": factor.anchor_value if factor else "",
                      "to": factor.target_value if factor else "", "given": w.current,
                      "probs": [float(x) for x in p], "estimate": estimate,
                      "prompt": ex.prompt})
      w.current = estimate
      if depth == w.n_calls - 1:
        w.probs = p
    depth += 1

  out = np.full((len(targets), scoring.MAX_OPTIONS), np.nan)
  by_target = collections.defaultdict(list)
  for w in walks:
    by_target[w.target].append(w)
  trajectories, answered_by = [], collections.Counter()
  for i, t in enumerate(targets):
    done = [w.probs for w in by_target[i] if w.probs is not None]
    if done:
      out[i] = 0.0
      out[i, :t.n_options] = aggregate(np.stack(done), how)
      how_answered = "anchors"
    elif direct_probs is not None:
      out[i] = direct_probs[i]
      how_answered = "direct"
    else:
      how_answered = "none"
    answered_by[how_answered] += 1
    details = {"answered_by": how_answered, "aggregate": how,
               "walks": [_walk_json(w) for w in by_target[i]]}
    trajectories.append(Trajectory.of(t, "", None, "imagining", **details)
                        if how_answered == "none" else
                        Trajectory.chosen(t, out[i, :t.n_options], "imagining", **details))
  n_anchors = collections.Counter(len(chosen.get(i, ())) for i in range(len(targets)))
  stats = {"targets": len(targets), "imagined": answered_by["anchors"],
           "fallback": answered_by["direct"], "missing": answered_by["none"],
           "coverage": answered_by["anchors"] / len(targets) if targets else float("nan"),
           "no_anchors": n_anchors[0], "k": k,
           "anchors_per_target": {str(n): c for n, c in sorted(n_anchors.items())},
           "walks": len(walks),
           "walks_by_steps": {str(n): c for n, c in sorted(collections.Counter(
               len(w.pair.factors) for w in walks).items())},
           "walks_failed": dict(failed), "scoring_calls": calls, "prompts_scored": prompts_scored,
           "skipped": skipped}
  return out, trajectories, stats
