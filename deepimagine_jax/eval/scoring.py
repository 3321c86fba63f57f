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
kept as text: predictions.py parses them as the benchmark does, and a text that
does not parse is counted as a failure, never given probabilities.

Shape letters: the legend in model.py (Q questions, O option slots, C candidate tokens).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipeline import templates
from data_pipeline.example import Example
from data_pipeline.grain_pipeline import rl_prompt
from deepimagine_jax import prefix, rewards, sampler, sharding
from deepimagine_jax.config import EvalConfig
from deepimagine_jax.eval import predictions
from deepimagine_jax.eval.report import Trajectory

MAX_OPTIONS = 3
PROMPT_BUCKET = 64  # scoring trims a batch's shared left padding to a multiple of this


# Prompts -----------------------------------------------------------------------

def _check_examples(examples: Sequence[Example]):
  for ex in examples:
    if ex.n_options not in (2, 3):
      raise ValueError(f"example {ex.id}: field 'options' has {ex.n_options} entries, "
                       "need 2 or 3")
    if not ex.prompt:
      raise ValueError(f"example {ex.id}: field 'prompt' is empty (render it first)")


def prompt_arrays(tokenizer, examples: Sequence[Example], prompt_len: int):
  """Left-padded prompts [Q, P] and their masks [Q, P] (1 = real token), as RL sees them."""
  prompts = np.full((len(examples), prompt_len), tokenizer.pad_id, np.int32)
  masks = np.zeros((len(examples), prompt_len), np.int32)
  for i, ex in enumerate(examples):
    row = rl_prompt(ex, tokenizer, prompt_len)
    prompts[i], masks[i] = row["prompt_tokens"], row["prompt_mask"]
  return prompts, masks


def _fill_rows(arrays, rows: int, bos_id: int | None):
  """Pads (prompt, prompt mask, ...) to `rows` rows: one batch shape, one compile.

  A filler row is a lone BOS (the sampler needs one real last token; token 0 for a
  tokenizer without BOS, such as Qwen3's; the row's output is dropped); other arrays are
  padded with zeros, which the masks make inert.
  """
  n = arrays[0].shape[0]
  if n == rows:
    return arrays
  out = [np.concatenate([x, np.zeros((rows - n,) + x.shape[1:], x.dtype)]) for x in arrays]
  out[0][n:, -1], out[1][n:, -1] = 0 if bos_id is None else bos_id, 1
  return out


# Scoring -----------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef",))
def option_logprobs(graphdef, params, prompt_QP, prompt_mask_QP, candidates_QOC,
                    candidate_mask_QOC, adapter_Q=None):
  """log p(candidate o | prompt) for every question and option slot: [Q, O] float32.

  The shared-prefix forward (prefix.py): each prompt runs once into a KV cache,
  which is fanned out to its O candidates (row q*O + o), as the GRPO trainer
  does for its G completions. Padding after a candidate's end is masked out; an
  option slot with an all-zero mask scores 0 (a 2-option question's third slot).
  `adapter_Q` [Q]: each question's LoRA adapter (None: the model's active one).
  """
  model = nnx.merge(graphdef, params)
  Q, O, C = candidates_QOC.shape
  logp_QOC = prefix.continuation_logprobs(model, prompt_QP, prompt_mask_QP,
                                          candidates_QOC.reshape(Q * O, C),
                                          group_size=O, adapter_Q=adapter_Q).reshape(Q, O, C)
  return jnp.sum(jnp.where(candidate_mask_QOC > 0, logp_QOC, 0.0), axis=-1)


def candidate_arrays(tokenizer, examples: Sequence[Example]):
  """Candidates [Q, O, C] and their masks [Q, O, C]: option o's DECISION line + EOS.

  C is the longest candidate of any option count, so the shape (and the compiled
  forward) does not depend on which questions are in the set.
  """
  lines = {n: [tokenizer.encode(templates.decision_line(n, o)) + [tokenizer.eos_id]
               for o in range(n)] for n in (2, 3)}
  C = max(len(c) for cs in lines.values() for c in cs)
  candidates = np.full((len(examples), MAX_OPTIONS, C), tokenizer.pad_id, np.int32)
  masks = np.zeros((len(examples), MAX_OPTIONS, C), np.int32)
  for i, ex in enumerate(examples):
    for o, c in enumerate(lines[ex.n_options]):
      candidates[i, o, :len(c)], masks[i, o, :len(c)] = c, 1
  return candidates, masks


def batched_option_logprobs(graphdef, params, arrays, *, batch_size: int,
                            bos_id: int) -> np.ndarray:
  """[Q, O] float64 log p(candidate | prompt) of (prompts, prompt masks, candidates,
  candidate masks[, adapters [Q]]) as prompt_arrays and candidate_arrays give them.

  batch_size counts questions; every batch is dispatched before any is read back.
  Questions go longest prompt first and each batch drops the left padding all its
  rows share (kept to a multiple of PROMPT_BUCKET slots: a few compiled shapes),
  so short prompts do not pay for every prompt slot. Exact: padding is masked and
  positions count real tokens only.
  """
  Q, P = arrays[0].shape
  order = np.argsort(-arrays[1].sum(axis=1), kind="stable")
  arrays = [x[order] for x in arrays]
  pending = []
  with sharding.on_params_mesh(params):  # each batch split over the devices
    for s in range(0, Q, batch_size):
      batch = list(_fill_rows([x[s:s + batch_size] for x in arrays], batch_size, bos_id))
      longest = int(batch[1].sum(axis=1).max())
      keep = min(P, -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET)
      batch[0], batch[1] = batch[0][:, -keep:], batch[1][:, -keep:]
      pending.append((order[s:s + batch_size],
                      option_logprobs(graphdef, params, *map(jnp.asarray, batch))))
  logp_QO = np.zeros((Q, arrays[2].shape[1]), np.float64)
  for rows, logp_BO in pending:
    logp_QO[rows] = sharding.host_array(logp_BO).astype(np.float64)[:len(rows)]
  return logp_QO


def option_probs_by_scoring(graphdef, params, tokenizer, examples: Sequence[Example], *,
                            prompt_len: int, batch_size: int,
                            adapters: Sequence[int] | None = None) -> np.ndarray:
  """[Q, O] option probabilities (softmax of candidate log-likelihoods), 0 past n_options.

  batch_size counts questions (batched_option_logprobs). `adapters`: each example's
  LoRA adapter index (lora.route; None: the model's active adapter for all).
  """
  _check_examples(examples)
  extra = () if adapters is None else (np.asarray(adapters, np.int32).reshape(len(examples)),)
  logp_QO = batched_option_logprobs(
      graphdef, params, (*prompt_arrays(tokenizer, examples, prompt_len),
                         *candidate_arrays(tokenizer, examples), *extra),
      batch_size=batch_size, bos_id=tokenizer.bos_id)
  probs = np.zeros((len(examples), MAX_OPTIONS), np.float64)
  for q, ex in enumerate(examples):
    logp = logp_QO[q, :ex.n_options]
    probs[q, :ex.n_options] = np.exp(logp - np.logaddexp.reduce(logp))
  return probs


# Sampling ----------------------------------------------------------------------

def decode_completion(tokenizer, tokens_C: np.ndarray, length: int) -> str:
  """The sampled text without its EOS."""
  ids = [int(t) for t in tokens_C[:length]]
  if ids and ids[-1] == tokenizer.eos_id:
    ids = ids[:-1]
  return tokenizer.decode(ids)


def sample_texts(graphdef, params, tokenizer, examples: Sequence[Example], *, runs: int,
                 temperature: float, max_new_tokens: int, batch_size: int, prompt_len: int,
                 seed: int, adapters: Sequence[int] | None = None) -> list[list[str]]:
  """`runs` lists of completions, one sampled per question per run, each run with its own key.

  Nothing is parsed here: the texts are the answers (predictions.py reads them
  as the benchmark does and counts what does not parse). `adapters`: each
  example's LoRA adapter index (None: the model's active adapter for all).
  """
  _check_examples(examples)
  if runs < 1:
    raise ValueError(f"eval.runs must be >= 1, got {runs}")
  prompts = prompt_arrays(tokenizer, examples, prompt_len)
  if adapters is not None:
    prompts = (*prompts, np.asarray(adapters, np.int32).reshape(len(examples)))
  texts_runs = []
  for r in range(runs):
    texts = []
    for s in range(0, len(examples), batch_size):
      prompt_BP, mask_BP, *adapter_B = _fill_rows([x[s:s + batch_size] for x in prompts],
                                                  batch_size, tokenizer.bos_id)
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), r), s)
      out = sampler.sample(graphdef, params, jnp.asarray(prompt_BP), jnp.asarray(mask_BP), key,
                           max_new_tokens=max_new_tokens, temperature=temperature,
                           eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                           adapter_Q=jnp.asarray(adapter_B[0]) if adapter_B else None)
      tokens_BC, lengths_B = sharding.host_array(out.tokens), sharding.host_array(out.lengths)
      texts += [decode_completion(tokenizer, tokens_BC[b], int(lengths_B[b]))
                for b in range(len(examples[s:s + batch_size]))]
    texts_runs.append(texts)
  return texts_runs


# The whole evaluation ----------------------------------------------------------

def trimmed(probs: np.ndarray, examples: Sequence[Example]) -> list[np.ndarray]:
  """[Q, O] probabilities -> per-question vectors of each question's own length."""
  return [np.asarray(p[:ex.n_options], np.float64) for p, ex in zip(probs, examples)]


def evaluate_policy(graphdef, params, tokenizer, examples: Sequence[Example],
                    eval_cfg: EvalConfig, *, prompt_len: int, seed: int = 0):
  """(trajectories, predictions_runs) of one policy on CT Open questions.

  Reads eval_cfg's mode, runs, temperature, max_new_tokens and batch_size.
  predictions_runs is a list of benchmark prediction dicts, one per run (one in
  scoring mode, whose texts carry the exact probabilities); they are what gets
  scored. Trajectories hold every run's answers (probs None where the text
  does not parse).
  """
  examples = list(examples)
  if eval_cfg.mode == "score":
    probs = trimmed(option_probs_by_scoring(graphdef, params, tokenizer, examples,
                                            prompt_len=prompt_len,
                                            batch_size=eval_cfg.batch_size), examples)
    trajectories = [Trajectory.chosen(ex, p, "direct", run=0) for ex, p in zip(examples, probs)]
    return trajectories, [predictions.predictions_from_probs(examples, probs)]
  # "sample" (EvalConfig admits no other mode)
  texts_runs = sample_texts(graphdef, params, tokenizer, examples, runs=eval_cfg.runs,
                            temperature=eval_cfg.temperature,
                            max_new_tokens=eval_cfg.max_new_tokens,
                            batch_size=eval_cfg.batch_size, prompt_len=prompt_len, seed=seed)
  trajectories, preds_runs = [], []
  for r, texts in enumerate(texts_runs):
    for ex, text in zip(examples, texts):
      d = rewards.parse_decision(text, ex.n_options)
      trajectories.append(Trajectory.of(ex, text, d.probs if d.ok else None, "direct", run=r))
    preds_runs.append({predictions.question_key(ex): text for ex, text in zip(examples, texts)})
  return trajectories, preds_runs
