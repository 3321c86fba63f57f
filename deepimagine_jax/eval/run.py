"""The evaluation entry: baselines, the model's direct answers, successive imagining, one report.

Everything is scored by the same code (metrics.py) on the same questions: CT
Open Summer 2025 (the questions of split "eval" that carry the benchmark's key).
The baselines train on the CT Open Winter 2025 questions (the benchmark
questions of every other split) and always use all eval questions; the model
parts respect eval_cfg.max_questions. Files written under workdir:
  eval/predictions_<name>_run<r>.pkl / .jsonl   benchmark predictions per run
  eval/trajectories_<name>.jsonl                 every answer (imagining: every step)
  eval/results.json                              name -> metrics, plus imagining stats
  report/                                        eval.report.write_report

With eval_cfg.pair_eval, the counterfactual pairs (natural_pair / approximate_pair)
are evaluated too, under names "pairs/<name>": the TF-IDF learners without and
with anchor features (baselines.pair_baselines; trained on the train and rl
splits' pairs, the data the model learns from; dev stays held out) on every
eval-split pair, and the model in scoring mode on at most eval_cfg.max_pairs of
them, all scored by metrics.py. A pair's category is its target's CT Open
category, else "<n>-way/pair".
"""
from __future__ import annotations

import logging
import os
import pathlib
import time
from collections import Counter
from typing import Mapping, Sequence

import numpy as np

from data_pipeline import io, templates
from data_pipeline.example import Example
from deepimagine_jax.config import EvalConfig
from deepimagine_jax.eval import baselines, imagining, metrics, predictions, report, scoring

EVAL_SPLIT = "eval"
PAIR_KINDS = ("natural_pair", "approximate_pair")
PAIR_TRAIN_SPLITS = ("train", "rl")

Splits = Mapping[str, Sequence[Example]]  # split name -> examples (BuiltData.examples)


def is_benchmark_question(ex: Example) -> bool:
  """A CT Open question: a plain question that carries the benchmark's key."""
  return ex.kind == "question" and predictions.has_key(ex)


def rendered(ex: Example) -> Example:
  return ex if ex.prompt else templates.render(ex)


def eval_questions(built_examples: Splits) -> list[Example]:
  """CT Open questions of the eval split, prompts rendered where missing."""
  return [rendered(ex) for ex in built_examples.get(EVAL_SPLIT, ()) if is_benchmark_question(ex)]


def train_questions_of(built_examples: Splits) -> list[Example]:
  """CT Open questions of every split but eval (the Winter release)."""
  return [ex for split, exs in built_examples.items() if split != EVAL_SPLIT
          for ex in exs if is_benchmark_question(ex)]


def model_subset(questions: Sequence[Example], max_questions: int) -> list[Example]:
  """All questions (max_questions 0) or max_questions spread evenly over the file order.

  The file groups questions by trial and category, so a head slice would be one
  category; evenly spaced indices keep the subset deterministic and mixed.
  """
  if max_questions <= 0 or max_questions >= len(questions):
    return list(questions)
  idx = np.unique(np.linspace(0, len(questions) - 1, max_questions).round().astype(int))
  return [questions[i] for i in idx]


def chains_of(built_examples: Splits) -> list[Example]:
  return [ex for exs in built_examples.values() for ex in exs if ex.kind == "chain"]


def pair_examples(built_examples: Splits, splits: Sequence[str],
                  skipped: Counter | None = None) -> list[Example]:
  """Counterfactual pairs of `splits`, category defaulted, prompts rendered where missing.

  Pairs whose target or anchor has no positive option (e.g. the ctgov
  "neutral_higher" questions) or an unknown perturbation are skipped, counted
  per reason in `skipped`, so baselines and model score the same pairs.
  """
  out = []
  for split in splits:
    for ex in built_examples.get(split, ()):
      if ex.kind not in PAIR_KINDS:
        continue
      why = baselines.pair_problem(ex)
      if why:
        if skipped is not None:
          skipped[f"{split}:{why}"] += 1
        continue
      out.append(rendered(ex.replace(category=ex.category or f"{ex.n_options}-way/pair")))
  return out


def evaluate_pairs(graphdef, params, tokenizer, built_examples: Splits, eval_cfg: EvalConfig,
                   *, prompt_len: int, out_dir: pathlib.Path) -> tuple[dict, dict]:
  """({"pairs/<name>": metrics}, info) for the counterfactual pairs of the eval split."""
  skipped: Counter = Counter()
  evals = pair_examples(built_examples, (EVAL_SPLIT,), skipped)
  train = pair_examples(built_examples, PAIR_TRAIN_SPLITS, skipped)
  info = {"eval_pairs": len(evals), "train_pairs": len(train),
          "train_splits": list(PAIR_TRAIN_SPLITS), "skipped": dict(sorted(skipped.items()))}
  results: dict = {}
  if not evals:
    logging.warning("evaluate: no counterfactual pairs in split %r; pair evaluation skipped",
                    EVAL_SPLIT)
    info["note"] = f"no counterfactual pairs in split {EVAL_SPLIT!r}"
    return results, info
  if eval_cfg.baselines:
    if train:
      base = baselines.pair_baselines(train, evals, eval_cfg.rf_seeds)
      results.update({report.PAIR_PREFIX + k: v for k, v in base.items()})
    else:
      logging.warning("evaluate: no training pairs; pair baselines skipped")
      info["note"] = "pair baselines skipped: no training pairs"
  if graphdef is not None:
    subset = model_subset(evals, eval_cfg.max_pairs)
    t0 = time.perf_counter()
    probs = scoring.option_probs_by_scoring(graphdef, params, tokenizer, subset,
                                            prompt_len=prompt_len, batch_size=eval_cfg.batch_size)
    info["model_seconds"] = time.perf_counter() - t0
    info["model_pairs"] = len(subset)
    probs_list = scoring.trimmed(probs, subset)
    results[report.PAIR_PREFIX + "model_score"] = metrics.score_questions(subset, probs_list)
    traj = [report.Trajectory.chosen(ex, p, "pair_score", anchor_id=ex.anchor.id)
            for ex, p in zip(subset, probs_list)]
    io.write_jsonl(out_dir / "trajectories_pairs_model_score.jsonl", [t.to_json() for t in traj])
  return results, info


def evaluate(graphdef, params, tokenizer, built_examples: Splits, eval_cfg: EvalConfig, *,
             prompt_len: int, workdir: str | os.PathLike,
             metrics_logs: Sequence[str | os.PathLike] = (), seed: int = 0) -> dict:
  """Runs what eval_cfg asks for; returns {name: metrics}. graphdef None: baselines only."""
  workdir = pathlib.Path(workdir)
  out_dir = workdir / "eval"
  out_dir.mkdir(parents=True, exist_ok=True)
  questions = eval_questions(built_examples)
  if not questions:
    raise ValueError(f"no CT Open questions in split {EVAL_SPLIT!r} of the built examples "
                     f"(splits: {sorted(built_examples)})")
  results: dict = {}
  extra: dict = {}
  if eval_cfg.baselines:
    train = train_questions_of(built_examples)
    if train:
      results.update(baselines.run_baselines(train, questions, eval_cfg.rf_seeds))
    else:
      logging.warning("evaluate: no CT Open training questions; baselines skipped")
      extra["notes"] = ["baselines skipped: no CT Open training questions"]

  trajectories: list = []
  if graphdef is not None:
    subset = model_subset(questions, eval_cfg.max_questions)
    t0 = time.perf_counter()
    scores, traj, preds_runs = scoring.evaluate_policy(
        graphdef, params, tokenizer, subset, eval_cfg, prompt_len=prompt_len, seed=seed)
    extra["model_seconds"] = time.perf_counter() - t0
    name = f"model_{eval_cfg.mode}"
    results[name] = scores
    predictions.write_runs(out_dir, name, preds_runs)
    io.write_jsonl(out_dir / f"trajectories_{name}.jsonl", [t.to_json() for t in traj])
    trajectories.extend(traj)

    if eval_cfg.imagining:
      direct = None
      if eval_cfg.mode == "score":  # reuse the direct scores for the fallback
        direct = np.zeros((len(subset), scoring.MAX_OPTIONS))
        for i, t in enumerate(traj):
          direct[i, :len(t.probs)] = t.probs
      t0 = time.perf_counter()
      probs, steps, stats = imagining.imagine(
          graphdef, params, tokenizer, subset, chains_of(built_examples),
          k=eval_cfg.imagining_k, how=eval_cfg.aggregate, prompt_len=prompt_len,
          batch_size=eval_cfg.batch_size, direct_probs=direct,
          exclude_anchor_ids={q.id for q in questions},
          exclude_anchor_trials={q.trial_id for q in questions})
      stats["seconds"] = time.perf_counter() - t0
      name = "model_imagining"
      probs_list = scoring.trimmed(probs, subset)
      scores = metrics.score_questions(subset, probs_list)
      scores["overall"]["imagining"] = stats
      results[name] = scores
      extra["imagining"] = stats
      predictions.write_runs(out_dir, name,
                             [predictions.predictions_from_probs(subset, probs_list)])
      io.write_jsonl(out_dir / f"trajectories_{name}.jsonl", [t.to_json() for t in steps])
      trajectories.extend(report.Trajectory.chosen(q, p, "imagining")
                          for q, p in zip(subset, probs_list))

  pair_results: dict = {}
  if eval_cfg.pair_eval:
    pair_results, extra["pairs"] = evaluate_pairs(
        graphdef, params, tokenizer, built_examples, eval_cfg, prompt_len=prompt_len,
        out_dir=out_dir)
    results.update(pair_results)

  io.write_json(out_dir / "results.json", {"results": results, **extra}, indent=2,
                sort_keys=True)
  report.write_report(workdir / "report", report.pairs_apart(results), metrics_logs,
                      trajectories)
  print(report.format_table({k: v for k, v in results.items() if k not in pair_results}))
  if pair_results:
    p = extra["pairs"]
    print(f"Counterfactual pairs (eval split): baselines on all {p['eval_pairs']} pairs "
          f"(trained on {p['train_pairs']} {'+'.join(p['train_splits'])} pairs), model on "
          f"{p.get('model_pairs', 0)}; skipped {p['skipped']}\n")
    print(report.format_table(pair_results))
  return results
