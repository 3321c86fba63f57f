"""A policy on CT Open: option probabilities by scoring the answers or by sampling them.

Scoring: each option i of a question gets the candidate completion
`templates.decision_line(n, i)` + EOS (the exact tokens SFT trains on:
`[BOS] prompt completion [EOS]`, prompt and completion encoded separately), its
log-likelihood given the prompt is computed in one jitted call per batch of
questions (prefix.py: the prompt runs once into a KV cache, fanned out to the
option candidates), and the options of a question are softmax-normalised.
Deterministic, no parse failures, and it reads the model's whole belief rather
than one draw.

Sampling: `runs` independent sampled completions per question (sampler.sample),
each parsed by rewards.parse_decision; a failure scores as uniform and is counted.
"""
from __future__ import annotations

import functools
import logging
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipeline import templates
from data_pipeline.grain_pipeline import rl_prompt
from deepimagine_jax import prefix
from deepimagine_jax import rewards
from deepimagine_jax import sampler
from deepimagine_jax.config import EvalConfig
from deepimagine_jax.eval import metrics, predictions

MAX_OPTIONS = 3


# Scoring ---------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef",))
def _option_logprobs(graphdef, params, prompt_BP, prompt_mask_BP, candidates_BOT,
                     candidate_mask_BOT):
  """log p(candidate o | prompt) for every question and option slot: [B, O] float32.

  The shared-prefix forward (prefix.py): each prompt runs once into a KV cache,
  which is fanned out to its O candidates (row b*O + o), as the GRPO trainer
  does for its G completions. Padding after a candidate's end is masked out; an
  option slot with an all-zero mask scores 0 (a 2-option question's third slot).
  """
  model = nnx.merge(graphdef, params)
  B, O, T = candidates_BOT.shape
  logp_BOT = prefix.continuation_logprobs(model, prompt_BP, prompt_mask_BP,
                                          candidates_BOT.reshape(B * O, T),
                                          group_size=O).reshape(B, O, T)
  return jnp.sum(jnp.where(candidate_mask_BOT > 0, logp_BOT, 0.0), axis=-1)


def candidate_tokens(tokenizer, n_options: int) -> list[list[int]]:
  """Token ids of each option's one-hot DECISION line followed by EOS."""
  return [tokenizer.encode(templates.decision_line(n_options, i)) + [tokenizer.eos_id]
          for i in range(n_options)]


def _prompt_row(ex: Mapping, tokenizer, prompt_len: int) -> dict:
  """rl_prompt's left-padded row; only prompt text is needed (no label at inference)."""
  return rl_prompt({"id": ex.get("id", "?"), "prompt": ex["prompt"], "options": ex["options"],
                    "label": 0}, tokenizer, prompt_len)


def _check_examples(examples: Sequence[Mapping]):
  for ex in examples:
    n = len(ex.get("options") or ())
    if n not in (2, 3):
      raise ValueError(f"example {ex.get('id', '?')}: field 'options' has {n} entries, need 2 or 3")
    if not ex.get("prompt"):
      raise ValueError(f"example {ex.get('id', '?')}: field 'prompt' is empty (render it first)")


def scoring_arrays(tokenizer, examples: Sequence[Mapping], prompt_len: int):
  """prompt [N, P], prompt mask [N, P], candidates [N, 3, C], candidate mask [N, 3, C].

  C is the longest candidate of any option count, so the shape (and the compiled
  forward) does not depend on which questions are in the set.
  """
  cands = {n: candidate_tokens(tokenizer, n) for n in (2, 3)}
  C = max(len(c) for cs in cands.values() for c in cs)
  N = len(examples)
  prompt = np.full((N, prompt_len), tokenizer.pad_id, np.int32)
  pmask = np.zeros((N, prompt_len), np.int32)
  cand = np.full((N, MAX_OPTIONS, C), tokenizer.pad_id, np.int32)
  cmask = np.zeros((N, MAX_OPTIONS, C), np.int32)
  for qi, ex in enumerate(examples):
    row = _prompt_row(ex, tokenizer, prompt_len)
    prompt[qi], pmask[qi] = row["prompt_tokens"], row["prompt_mask"]
    for o, c in enumerate(cands[len(ex["options"])]):
      cand[qi, o, :len(c)], cmask[qi, o, :len(c)] = c, 1
  return prompt, pmask, cand, cmask


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  """Pads to n rows with zeros (pad id 0, mask 0): fixed batch shape, no recompiles."""
  if x.shape[0] == n:
    return x
  return np.concatenate([x, np.zeros((n - x.shape[0],) + x.shape[1:], x.dtype)])


def candidate_logprobs(graphdef, params, arrays, batch_size: int) -> np.ndarray:
  """[N, 3] log p(candidate | prompt), in fixed batches of batch_size questions."""
  n = arrays[0].shape[0]
  out = []
  for s in range(0, n, batch_size):
    e = min(s + batch_size, n)
    lp_BO = _option_logprobs(graphdef, params,
                             *(jnp.asarray(_pad_rows(x[s:e], batch_size)) for x in arrays))
    out.append((s, e, lp_BO))  # dispatch every batch before reading any back
  res = np.zeros((n, MAX_OPTIONS), np.float64)
  for s, e, lp_BO in out:
    res[s:e] = np.asarray(lp_BO)[:e - s]
  return res


def option_probs_by_scoring(graphdef, params, tokenizer, examples: Sequence[Mapping], *,
                            prompt_len: int, batch_size: int) -> np.ndarray:
  """[N, 3] option probabilities (softmax of candidate log-likelihoods), 0 past n_options."""
  _check_examples(examples)
  lp_N3 = candidate_logprobs(graphdef, params, scoring_arrays(tokenizer, examples, prompt_len),
                             batch_size)
  probs = np.zeros((len(examples), MAX_OPTIONS), np.float64)
  for qi, ex in enumerate(examples):
    lp = lp_N3[qi, :len(ex["options"])]
    probs[qi, :len(lp)] = np.exp(lp - np.logaddexp.reduce(lp))
  return probs


# Sampling --------------------------------------------------------------------

def _prompt_batch(tokenizer, examples: Sequence[Mapping], prompt_len: int, batch_size: int):
  """Left-padded prompt rows, padded to batch_size with BOS-only rows."""
  rows = [_prompt_row(ex, tokenizer, prompt_len) for ex in examples]
  tok = np.full((batch_size, prompt_len), tokenizer.pad_id, np.int32)
  mask = np.zeros((batch_size, prompt_len), np.int32)
  tok[:, -1], mask[:, -1] = tokenizer.bos_id, 1  # a filler row needs one real last token
  for b, r in enumerate(rows):
    tok[b], mask[b] = r["prompt_tokens"], r["prompt_mask"]
  return jnp.asarray(tok), jnp.asarray(mask)


def decode_completion(tokenizer, tokens_N: np.ndarray, length: int) -> str:
  """The sampled text without its EOS."""
  ids = [int(t) for t in tokens_N[:length]]
  if ids and ids[-1] == tokenizer.eos_id:
    ids = ids[:-1]
  return tokenizer.decode(ids)


def option_probs_by_sampling(graphdef, params, tokenizer, examples: Sequence[Mapping], *,
                             runs: int, temperature: float, max_new_tokens: int,
                             batch_size: int, prompt_len: int, seed: int):
  """(probs_runs: list of [N, 3], texts_runs: list of list[str], failures: {code: count}).

  Each run samples every question once with its own key; an unparseable
  completion gets uniform probabilities and is counted by error code.
  """
  _check_examples(examples)
  if runs < 1:
    raise ValueError(f"runs must be >= 1, got {runs}")
  probs_runs, texts_runs, failures = [], [], {}
  for r in range(runs):
    probs = np.zeros((len(examples), MAX_OPTIONS), np.float64)
    texts = []
    for s in range(0, len(examples), batch_size):
      chunk = examples[s:s + batch_size]
      tok_BP, mask_BP = _prompt_batch(tokenizer, chunk, prompt_len, batch_size)
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), r), s)
      out = sampler.sample(graphdef, params, tok_BP, mask_BP, key,
                           max_new_tokens=max_new_tokens, temperature=temperature,
                           eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
      tokens_BN, lengths_B = np.asarray(out.tokens), np.asarray(out.lengths)
      for b, ex in enumerate(chunk):
        text = decode_completion(tokenizer, tokens_BN[b], int(lengths_B[b]))
        n = len(ex["options"])
        d = rewards.parse_decision(text, n)
        if d.ok:
          probs[s + b, :n] = d.probs
        else:
          probs[s + b, :n] = 1.0 / n
          code = f"unparsed:{d.error_code}"
          failures[code] = failures.get(code, 0) + 1
        texts.append(text)
    probs_runs.append(probs)
    texts_runs.append(texts)
  return probs_runs, texts_runs, failures


# The whole evaluation -----------------------------------------------------------

def trimmed(probs_N3: np.ndarray, examples: Sequence[Mapping]) -> list[np.ndarray]:
  """Per-question probability vectors of each question's own length."""
  return [np.asarray(p[:len(ex["options"])], np.float64) for p, ex in zip(probs_N3, examples)]


def trajectory(ex: Mapping, completion: str, probs, **extra) -> dict:
  """One report trajectory (report.write_report's fields plus id)."""
  label = int(ex["label"])
  p = None if probs is None else [float(x) for x in probs]
  return {"id": ex.get("id", ""), "prompt": ex.get("prompt", ""), "completion": completion,
          "probs": p, "label": label,
          "correct": p is not None and metrics.choose(p) == label,
          "perturbation": ex.get("perturbation", ""), "category": ex.get("category", ""),
          **extra}


def has_key(ex: Mapping) -> bool:
  return bool(ex.get("nct_id")) and int(ex.get("question_index", -1)) >= 0


def evaluate_policy(graphdef, params, tokenizer, eval_examples: Sequence[Mapping],
                    eval_cfg: EvalConfig, *, prompt_len: int, seed: int = 0):
  """(scores, trajectories, predictions_runs) for one policy on CT Open questions.

  Reads eval_cfg's mode, runs, temperature, max_new_tokens and batch_size.
  predictions_runs is a list of benchmark prediction dicts, one per
  run (one in scoring mode, whose texts carry the exact probabilities so the
  files score identically); trajectories hold every run's answers.
  """
  mode = eval_cfg.mode
  examples = list(eval_examples)
  if mode == "score":
    probs = option_probs_by_scoring(graphdef, params, tokenizer, examples,
                                    prompt_len=prompt_len, batch_size=eval_cfg.batch_size)
    runs = [trimmed(probs, examples)]
    texts_runs = [[templates.decision_line(len(p), metrics.choose(p)) for p in runs[0]]]
    pred_texts = [[predictions.format_decision(p) for p in runs[0]]]
    failures = {}
  else:  # "sample" (EvalConfig admits no other mode)
    probs_runs, texts_runs, failures = option_probs_by_sampling(
        graphdef, params, tokenizer, examples, runs=eval_cfg.runs,
        temperature=eval_cfg.temperature, max_new_tokens=eval_cfg.max_new_tokens,
        batch_size=eval_cfg.batch_size, prompt_len=prompt_len, seed=seed)
    runs = [trimmed(p, examples) for p in probs_runs]
    pred_texts = texts_runs
  scores = metrics.score_runs(examples, runs)
  scores["overall"]["failures"] = dict(failures)
  trajectories, preds_runs = [], []
  for r, (probs_r, texts_r, ptexts_r) in enumerate(zip(runs, texts_runs, pred_texts)):
    preds = {}
    for ex, p, text, ptext in zip(examples, probs_r, texts_r, ptexts_r):
      parsed = mode == "score" or rewards.parse_decision(text, len(ex["options"])).ok
      trajectories.append(trajectory(ex, text, p if parsed else None, run=r, method="direct"))
      if has_key(ex):
        preds[predictions.question_key(ex)] = ptext
    preds_runs.append(preds)
  if failures:
    logging.info("evaluate_policy: %s parse failures over %d runs", failures, len(runs))
  return scores, trajectories, preds_runs
