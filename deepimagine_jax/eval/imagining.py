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

With walk "per_arm" (eval.walk) the state is per-arm instead: the endpoint's
value in the target's two compared arms. It starts as the anchor's observed
answer with its arms' values where the registry gives them
(templates.anchor_state); at step d the model writes the values after the d-th
change (templates.render_arm_estimate_step; one greedy generation, `ESTIMATE:
(v1, v2)`); the last estimate is compared in one scored call
(templates.render_arm_compare), whose option distribution is the anchor's
decision. An estimate that does not parse ends the walk, counted
("estimate_unparsed"); so does a target without two named arms ("no_two_arms"). The
model learns both operators from the build's `arm_estimate` and `arm_compare`
examples (sft.kinds).

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
from flax import nnx

from data_pipeline import templates
from data_pipeline.example import Example
from deepimagine_jax import lora
from deepimagine_jax.eval import metrics, scoring
from deepimagine_jax.eval.report import Trajectory

AGGREGATES = ("mean", "geometric")
WALKS = ("decision", "per_arm")  # eval.walk: what a walk's state is
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
  current: str | templates.ArmState  # the result given to the next step
  steps: list  # one dict per call made
  probs: np.ndarray | None = None  # the final decision
  failed: str = ""

  @property
  def n_calls(self) -> int:
    return templates.arm_estimate_steps(self.pair)  # no known factor: one call

  def fail(self, why: str, failed: collections.Counter) -> None:
    self.failed = why
    failed[why] += 1


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
          "anchor_values": [a.value_a, a.value_b] if templates.has_arm_values(a) else None,
          "similarity": w.pair.similarity, "unknown_factors": list(w.pair.unknown_factors),
          "steps": w.steps, "failed": w.failed,
          "probs": None if w.probs is None else [float(x) for x in w.probs]}


def _adapters(routed, walks: Sequence[_Walk], depth: int | None):
  """Each walk's LoRA adapter for its call at `depth` (its factor's local operator; None:
  the comparison, the general adapter); None when one adapter serves every call."""
  if routed is None:
    return None
  return [lora.route(routed, w.pair.factors[depth].factor
                     if depth is not None and w.pair.factors else "") for w in walks]


def _step_record(w: _Walk, depth: int, routed, adapter) -> dict:
  factor = w.pair.factors[depth] if w.pair.factors else None
  given = w.current if isinstance(w.current, str) else w.current.text()
  return {"step": depth, "factor": factor.factor if factor else "",
          "adapter": "" if routed is None else routed.adapters[adapter],
          "from": factor.anchor_value if factor else "",
          "to": factor.target_value if factor else "", "given": given}


def _prompts(walks: Sequence[_Walk], tag: str, failed: collections.Counter, render):
  """(walks, their call's examples) for the walks whose prompt `render(walk)` fits the
  window; one that cannot fit ends there, counted."""
  live, examples = [], []
  for w in walks:
    try:
      prompt = render(w)
    except templates.PromptTooLong:
      w.fail("prompt_too_long", failed)
      continue
    live.append(w)
    examples.append(w.pair.replace(id=f"{w.pair.id}#{tag}", prompt=prompt))
  return live, examples


def _walk_decisions(walks, graphdef, params, tokenizer, n_tokens, *, prompt_len: int,
                    batch_size: int, failed: collections.Counter, counts: collections.Counter):
  """Walks whose state is an option sentence: every call is a scored decision."""
  routed = lora.routed_config(graphdef, params)  # each step by its factor's local operator
  depth = 0
  while True:
    live, examples = _prompts(
        [w for w in walks if not w.failed and depth < w.n_calls], f"step{depth}", failed,
        lambda w: step_prompt(w.pair, depth, w.current, n_tokens, prompt_len))
    if not live:
      break
    adapters = _adapters(routed, live, depth)
    step_probs = scoring.option_probs_by_scoring(graphdef, params, tokenizer, examples,
                                                 adapters=adapters,
                                                 prompt_len=prompt_len, batch_size=batch_size)
    counts["scoring_calls"] += 1
    counts["prompts_scored"] += len(live)
    for j, (w, ex, p3) in enumerate(zip(live, examples, step_probs)):
      p = p3[:ex.n_options]
      estimate = ex.options[metrics.choose(p)]
      w.steps.append({**_step_record(w, depth, routed, adapters and adapters[j]),
                      "probs": [float(x) for x in p], "estimate": estimate,
                      "prompt": ex.prompt})
      w.current = estimate
      if depth == w.n_calls - 1:
        w.probs = p
    depth += 1


def _walk_per_arm(walks, graphdef, params, tokenizer, n_tokens, *, prompt_len: int,
                  batch_size: int, max_new_tokens: int, failed: collections.Counter,
                  counts: collections.Counter):
  """Walks whose state is the two compared arms' values: a generated estimate per step,
  then one scored comparison."""
  routed = lora.routed_config(graphdef, params)
  for w in walks:
    w.current = templates.anchor_state(w.pair.anchor)
    if templates.compared_arms(w.pair) is None:
      w.fail("no_two_arms", failed)
  depth = 0
  while True:
    live, examples = _prompts(
        [w for w in walks if not w.failed and depth < w.n_calls],
        f"arms{depth}", failed, lambda w: templates.render_arm_estimate_step(
            w.pair, depth, w.current, n_tokens=n_tokens, max_tokens=prompt_len)[0])
    if not live:
      break
    adapters = _adapters(routed, live, depth)
    (texts,) = scoring.sample_texts(graphdef, params, tokenizer, examples, runs=1,
                                    temperature=0.0, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, prompt_len=prompt_len, seed=0,
                                    adapters=adapters)
    counts["generation_calls"] += 1
    counts["prompts_generated"] += len(live)
    for j, (w, ex, text) in enumerate(zip(live, examples, texts)):
      values = templates.parse_estimate(text)
      state = None if values is None else templates.estimate_state(w.pair, *values)
      w.steps.append({**_step_record(w, depth, routed, adapters and adapters[j]),
                      "probs": None, "estimate": text if state is None else state.text(),
                      "text": text,
                      "values": None if values is None else list(values),
                      "prompt": ex.prompt})
      if values is None:
        w.fail("estimate_unparsed", failed)
      else:
        w.current = state
    depth += 1
  live, examples = _prompts(
      [w for w in walks if not w.failed], "compare", failed,
      lambda w: templates.render_arm_compare(w.pair, w.current, n_tokens=n_tokens,
                                             max_tokens=prompt_len)[0])
  if live:
    adapters = _adapters(routed, live, None)
    probs = scoring.option_probs_by_scoring(graphdef, params, tokenizer, examples,
                                            adapters=adapters, prompt_len=prompt_len,
                                            batch_size=batch_size)
    counts["scoring_calls"] += 1
    counts["prompts_scored"] += len(live)
    for j, (w, ex, p3) in enumerate(zip(live, examples, probs)):
      w.probs = p3[:ex.n_options]
      w.steps.append({"step": len(w.steps), "factor": "compare", "from": "", "to": "",
                      "adapter": "" if routed is None else routed.adapters[adapters[j]],
                      "given": w.current.text(), "probs": [float(x) for x in w.probs],
                      "estimate": ex.options[metrics.choose(w.probs)], "prompt": ex.prompt})


def imagine(graphdef, params, tokenizer, targets: Sequence[Example], pairs: Sequence[Example],
            *, k: int, how: str, prompt_len: int, batch_size: int, walk: str,
            max_new_tokens: int,
            direct_probs: np.ndarray | None = None,
            exclude_anchor_ids: frozenset | set = frozenset(),
            exclude_anchor_trials: frozenset | set = frozenset()):
  """(probs [Q, O], one trajectory per target, stats).

  probs row q: target q's aggregated anchor decisions (0 past its n_options);
  NaN where it has no answer: no usable anchor and no finished walk, unless
  direct_probs [Q, O] is given, whose row is then used (counted as `fallback`).
  `walk` is what a walk carries (WALKS; the module docstring); "per_arm" generates
  each estimate greedily in at most max_new_tokens tokens.
  Each trajectory holds the final answer and, in details["walks"], every
  anchor's walk: its observed result, each step's change, the result given,
  the probabilities and the estimate chosen (per_arm: the text written and the
  values read, then the comparison). stats: targets, imagined (answered
  through anchors), fallback, missing, coverage (imagined / targets), anchors per target,
  walks by steps, failed walks by reason, scoring (and generation) calls and
  prompts, and the records left out (select_anchors).
  """
  if how not in AGGREGATES:
    raise ValueError(f"eval.aggregate must be one of {AGGREGATES}, got {how!r}")
  if walk not in WALKS:
    raise ValueError(f"eval.walk must be one of {WALKS}, got {walk!r}")
  if walk == "per_arm" and max_new_tokens < 1:
    raise ValueError(f"eval.max_new_tokens must be >= 1 for a per_arm walk, got {max_new_tokens}")
  if walk == "per_arm":
    context = nnx.merge(graphdef, params).cfg.max_seq_len
    if prompt_len + max_new_tokens > context:
      raise ValueError(f"data.prompt_len {prompt_len} + eval.max_new_tokens {max_new_tokens} "
                       f"exceeds the model's max_seq_len {context}: a per_arm walk writes each "
                       f"estimate after its prompt")
  if k < 1:
    raise ValueError(f"eval.imagining_k must be >= 1, got {k}")
  if direct_probs is not None and np.shape(direct_probs) != (len(targets), scoring.MAX_OPTIONS):
    raise ValueError(f"direct_probs of shape {np.shape(direct_probs)} for {len(targets)} targets")
  chosen, skipped = select_anchors(targets, pairs, k, exclude_anchor_ids, exclude_anchor_trials)
  walks = [_Walk(i, ex, ex.anchor.answer, []) for i in sorted(chosen) for ex in chosen[i]]
  n_tokens = prompt_tokens_counter(tokenizer)
  failed, counts = collections.Counter(), collections.Counter()
  if walk == "decision":
    _walk_decisions(walks, graphdef, params, tokenizer, n_tokens, prompt_len=prompt_len,
                    batch_size=batch_size, failed=failed, counts=counts)
  else:
    _walk_per_arm(walks, graphdef, params, tokenizer, n_tokens, prompt_len=prompt_len,
                  batch_size=batch_size, max_new_tokens=max_new_tokens, failed=failed,
                  counts=counts)

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
           "walks_failed": dict(failed), "walk": walk,
           "scoring_calls": counts["scoring_calls"], "prompts_scored": counts["prompts_scored"],
           "generation_calls": counts["generation_calls"],
           "prompts_generated": counts["prompts_generated"], "skipped": skipped}
  return out, trajectories, stats


def written_estimates(trajectories: Sequence[Trajectory], targets: Sequence[Example]):
  """(written [N, 2], anchors' [N, 2], observed [N, 2]) over the finished per-arm walks of
  targets whose two arms' values are known and whose anchor's are: each walk's last
  written values, its anchor's observed values, the target's observed values (NaN rows
  where an anchor has none are left out)."""
  written, anchor, observed = [], [], []
  for t, traj in zip(targets, trajectories):
    if not templates.has_arm_values(t):
      continue
    for w in traj.details["walks"]:
      values = [s["values"] for s in w["steps"] if s.get("values") is not None]
      if w["failed"] or not values or w["anchor_values"] is None:
        continue
      written.append(values[-1])
      anchor.append(w["anchor_values"])
      observed.append([t.value_a, t.value_b])
  shape = lambda x: np.asarray(x, np.float64).reshape(-1, 2)
  return shape(written), shape(anchor), shape(observed)


def estimate_quality(written: np.ndarray, anchor: np.ndarray, observed: np.ndarray) -> dict:
  """How written per-arm values match the observed ones, beside copying the anchor's:
  n, the share whose first-minus-second difference has the observed sign, the
  Pearson correlation of the differences and the mean absolute error per arm value."""
  def of(x):
    d, d_obs = x[:, 0] - x[:, 1], observed[:, 0] - observed[:, 1]
    r = (float(np.corrcoef(d, d_obs)[0, 1]) if len(d) > 1 and d.std() > 0 and d_obs.std() > 0
         else float("nan"))
    return {"sign_agreement": float(np.mean(np.sign(d) == np.sign(d_obs))) if len(d) else
            float("nan"), "diff_correlation": r,
            "mae": float(np.mean(np.abs(x - observed))) if len(d) else float("nan")}
  return {"n": int(len(observed)), "written": of(written), "anchor": of(anchor)}
