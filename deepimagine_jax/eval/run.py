"""The evaluation entry: baselines, the model's direct answers, successive imagining, one report.

Everything is scored by the same code (metrics.py) over the same questions: CT
Open Summer 2025 (the questions of split "eval" that carry the benchmark's key), or,
when CT Open is absent (the embedded sample), the registry-derived questions of the
trials posted last, given the benchmark's key by the build and named as such.
Each result is written as the benchmark's prediction files and scored from
those texts, twice: the benchmark's rules (answered questions only, coverage
beside every score) and the strict table (every question; failures and ties
are wrong). The baselines train on the CT Open Winter 2025 questions (the
benchmark questions of every other split), their hyper-parameters chosen by
cross-validation there; the model answers eval_cfg.max_questions of the
questions (all when 0) and its coverage says so.

With eval_cfg.imagining, the same questions are answered through their
retrieved anchors (imagining.imagine: `model_imagining`, stepwise walks from
each of the k nearest anchors) and, beside it, `copy_anchors`: the same anchors'
observed results copied and aggregated (the reference imagining must beat). A
question without a usable anchor is not answered by either (no fallback to the
direct answer): their coverage counts it. Files written under workdir:
  eval/predictions_<name>_run<r>.pkl / .jsonl   the benchmark's predictions, per run
  eval/trajectories_<name>.jsonl                 every answer (imagining: one row per target
                                                 holding every anchor's walk, step by step)
  eval/results.json                              name -> metrics, strict, CV choices, stats
  report/                                        eval.report.write_report

With eval_cfg.pair_eval, the counterfactual pairs (natural_pair / approximate_pair)
are evaluated too, under names "pairs/<name>": copy-the-anchor, the TF-IDF
learners without and with anchor features (baselines.pair_baselines; trained
on the train and rl splits' pairs, the data the model learns from; dev stays
held out) on every eval-split pair, and the model in scoring mode without and
with the anchor on at most eval_cfg.max_pairs of them. A pair's category is its
target's CT Open category, else "<n>-way/pair".
"""
from __future__ import annotations

import logging
import os
import pathlib
import time
from collections import Counter
from typing import Mapping, Sequence

import numpy as np

from data_pipeline import build, io, templates
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


def walk_records(built_examples: Splits, splits: Sequence[str] | None = None) -> list[Example]:
  """The cross-trial records (approximate pairs and chains) of `splits` (all when None)."""
  return [ex for split, exs in built_examples.items() if splits is None or split in splits
          for ex in exs if ex.kind in imagining.WALK_KINDS]


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


def target_question(pair: Example) -> Example:
  """The pair's target as a plain question (no anchor), rendered: what the model sees without it."""
  return templates.render(pair.replace(
      kind="question", anchor=None, anchor_trial_id="", factors=(), perturbation="",
      unknown_factors=(), similarity=None, prompt="", completion=""))


def scored(questions: Sequence[Example], runs: Sequence[Sequence]) -> tuple[dict, dict]:
  """(benchmark table, strict table) metrics of runs of answers over `questions`."""
  return (metrics.score_runs(questions, runs),
          metrics.score_runs(questions, runs, strict=True))


def answers_over(subset: Sequence[Example], probs: Sequence, examples: Sequence[Example]) -> list:
  """Answers over all `examples`: the subset's probabilities, None (not asked) elsewhere."""
  by_id = {ex.id: p for ex, p in zip(subset, probs)}
  return [by_id.get(ex.id) for ex in examples]


def evaluate_pairs(graphdef, params, tokenizer, built_examples: Splits, eval_cfg: EvalConfig,
                   *, prompt_len: int, out_dir: pathlib.Path) -> tuple[dict, dict, dict]:
  """({"pairs/<name>": metrics}, strict metrics, info) for the eval split's counterfactual pairs.

  Beside the learners without / with anchor features: copy-the-anchor (the
  reference to beat) and the model on the target question alone
  (`pairs/model_score`) and on the pair prompt (`pairs/model_score+anchor`),
  both on the same max_pairs pairs; every result is scored over all eval pairs,
  so the model's coverage shows how many it was asked.
  """
  skipped: Counter = Counter()
  evals = pair_examples(built_examples, (EVAL_SPLIT,), skipped)
  train = pair_examples(built_examples, PAIR_TRAIN_SPLITS, skipped)
  info = {"eval_pairs": len(evals), "train_pairs": len(train),
          "train_splits": list(PAIR_TRAIN_SPLITS), "skipped": dict(sorted(skipped.items()))}
  runs: dict = {}
  if not evals:
    logging.warning("evaluate: no counterfactual pairs in split %r; pair evaluation skipped",
                    EVAL_SPLIT)
    info["note"] = f"no counterfactual pairs in split {EVAL_SPLIT!r}"
    return {}, {}, info
  if eval_cfg.baselines:
    if train:
      runs, info["baselines"] = baselines.pair_baselines(train, evals, eval_cfg.rf_seeds,
                                                         eval_cfg.cv_folds)
    else:
      logging.warning("evaluate: no training pairs; pair baselines skipped")
      info["note"] = "pair baselines skipped: no training pairs"
  if graphdef is not None:
    subset = model_subset(evals, eval_cfg.max_pairs)
    t0 = time.perf_counter()
    for name, examples in (("model_score", [target_question(ex) for ex in subset]),
                           ("model_score+anchor", subset)):
      probs = scoring.trimmed(scoring.option_probs_by_scoring(
          graphdef, params, tokenizer, examples, prompt_len=prompt_len,
          batch_size=eval_cfg.batch_size), examples)
      runs[name] = [answers_over(subset, probs, evals)]
      traj = [report.Trajectory.chosen(ex, p, "pair_score", anchor_id=pair.anchor.id,
                                       pair_id=pair.id)
              for ex, pair, p in zip(examples, subset, probs)]
      io.write_jsonl(out_dir / f"trajectories_pairs_{name}.jsonl", [t.to_json() for t in traj])
    info["model_seconds"] = time.perf_counter() - t0
    info["model_pairs"] = len(subset)
  results, strict = {}, {}
  for name, r in runs.items():
    results[report.PAIR_PREFIX + name], strict[report.PAIR_PREFIX + name] = scored(evals, r)
  return results, strict, info


def copy_anchor_answers(built_examples: Splits, questions: Sequence[Example],
                        eval_cfg: EvalConfig) -> tuple[list, dict]:
  """Copy-the-anchor through imagining's anchors: (answers over `questions`, stats).

  Each question's anchors are chosen as imagining chooses them (the k nearest
  usable); each anchor's observed outcome class is copied with the agreement
  rate of the training splits' cross-trial records (baselines.copy_anchor_probs)
  and the k answers are aggregated as imagining aggregates. Records the pair
  baselines cannot read (baselines.pair_problem) are left out, counted; a
  question without anchors has no answer (None), counted.
  """
  problems: Counter = Counter()
  usable = []
  for ex in walk_records(built_examples):
    why = baselines.pair_problem(ex)
    if why:
      problems[why] += 1
    else:
      usable.append(ex)
  train = [ex for ex in walk_records(built_examples, PAIR_TRAIN_SPLITS)
           if not baselines.pair_problem(ex)]
  chosen, skipped = imagining.select_anchors(
      questions, usable, eval_cfg.imagining_k, {q.id for q in questions},
      {q.trial_id for q in questions})
  answers = [imagining.aggregate(np.stack(baselines.copy_anchor_probs(train, chosen[i])),
                                 eval_cfg.aggregate) if i in chosen else None
             for i in range(len(questions))]
  answered = sum(a is not None for a in answers)
  n_anchors = Counter(len(chosen.get(i, ())) for i in range(len(questions)))
  return answers, {"targets": len(questions), "imagined": answered, "fallback": 0,
                   "missing": len(questions) - answered, "coverage": answered / len(questions),
                   "no_anchors": n_anchors[0], "k": eval_cfg.imagining_k,
                   "anchors_per_target": {str(n): c for n, c in sorted(n_anchors.items())},
                   "train_records": len(train), "skipped": {**skipped, **problems}}


def evaluate_imagining(graphdef, params, tokenizer, built_examples: Splits,
                       questions: Sequence[Example], eval_cfg: EvalConfig, *, prompt_len: int,
                       out_dir: pathlib.Path) -> tuple[dict, list, dict]:
  """({name: [predictions]}, trajectories, {name: stats}) of imagining over the anchors.

  `model_imagining` (graphdef given): the model's stepwise walks from each of
  the first max_questions targets' k anchors; `copy_anchors` (eval_cfg.baselines):
  the anchors' own results over every question. A question not answered through
  its anchors is left out of the predictions, so the table's coverage shows it.
  """
  preds, stats, trajectories = {}, {}, []
  if eval_cfg.baselines:
    answers, stats["copy_anchors"] = copy_anchor_answers(built_examples, questions, eval_cfg)
    preds["copy_anchors"] = [answered_predictions(questions, answers)]
  if graphdef is not None:
    subset = model_subset(questions, eval_cfg.max_questions)
    t0 = time.perf_counter()
    probs, trajectories, st = imagining.imagine(
        graphdef, params, tokenizer, subset, walk_records(built_examples),
        k=eval_cfg.imagining_k, how=eval_cfg.aggregate, prompt_len=prompt_len,
        batch_size=eval_cfg.batch_size, walk=eval_cfg.walk,
        max_new_tokens=eval_cfg.max_new_tokens, exclude_anchor_ids={q.id for q in questions},
        exclude_anchor_trials={q.trial_id for q in questions})
    st["seconds"] = time.perf_counter() - t0
    stats["model_imagining"] = st
    answers = [None if np.isnan(p).any() else p for p in scoring.trimmed(probs, subset)]
    preds["model_imagining"] = [answered_predictions(subset, answers)]
    io.write_jsonl(out_dir / "trajectories_model_imagining.jsonl",
                   [t.to_json() for t in trajectories])
  return preds, trajectories, stats


def answered_predictions(questions: Sequence[Example], answers: Sequence) -> dict:
  """The benchmark's predictions of the questions with an answer (None: left out)."""
  kept = [(q, a) for q, a in zip(questions, answers) if a is not None]
  return predictions.predictions_from_probs([q for q, _ in kept], [a for _, a in kept])


def imagining_line(name: str, st: dict) -> str:
  """One line of imagining's coverage and cost (the stats of imagine / copy_anchor_answers)."""
  line = (f"{name}: answered through anchors {st['imagined']} of {st['targets']} asked "
          f"(coverage {st['coverage']:.3f}); no usable anchor {st['no_anchors']}, missing "
          f"{st['missing']}; k={st['k']}, anchors per target {st['anchors_per_target']}")
  if "walks" in st:
    line += (f"; {st['walk']} walks {st['walks']} by steps {st['walks_by_steps']}, failed "
             f"{st['walks_failed']}; {st['scoring_calls']} scoring calls, "
             f"{st['prompts_scored']} prompts")
    if st["generation_calls"]:
      line += (f", {st['generation_calls']} generation calls, "
               f"{st['prompts_generated']} prompts")
    line += f", {st['seconds']:.1f} s"
  return line


def evaluate(graphdef, params, tokenizer, built_examples: Splits, eval_cfg: EvalConfig, *,
             prompt_len: int, workdir: str | os.PathLike,
             metrics_logs: Sequence[str | os.PathLike] = (), seed: int = 0) -> dict:
  """Runs what eval_cfg asks for; returns {name: benchmark-table metrics}. graphdef None:
  baselines only.

  Every result on the CT Open questions is written as the benchmark's
  prediction files and scored from those texts (predictions.score_predictions),
  over all eval questions: the benchmark table and the strict one, coverage
  beside every score.
  """
  workdir = pathlib.Path(workdir)
  out_dir = workdir / "eval"
  out_dir.mkdir(parents=True, exist_ok=True)
  questions = eval_questions(built_examples)
  if not questions:
    raise ValueError(f"no benchmark questions (CT Open's, or registry-derived ones when CT Open "
                     f"is absent: data.registry_eval_fraction) in split {EVAL_SPLIT!r} of the "
                     f"built examples (splits: {sorted(built_examples)})")
  source = build.eval_source(questions)  # CT Open Summer 2025, or registry-derived: say which
  preds: dict = {}  # name -> prediction dicts, one per run
  extra: dict = {"notes": []}
  if eval_cfg.baselines:
    train = train_questions_of(built_examples)
    if train:
      probs, extra["baselines"] = baselines.baseline_probs(train, questions, eval_cfg.rf_seeds,
                                                           eval_cfg.cv_folds)
      preds.update({name: [predictions.predictions_from_probs(questions, p) for p in runs]
                    for name, runs in probs.items()})
    else:
      logging.warning("evaluate: no CT Open training questions; baselines skipped")
      extra["notes"].append("baselines skipped: no CT Open training questions")

  trajectories: list = []
  if graphdef is not None:
    subset = model_subset(questions, eval_cfg.max_questions)
    t0 = time.perf_counter()
    traj, preds_runs = scoring.evaluate_policy(
        graphdef, params, tokenizer, subset, eval_cfg, prompt_len=prompt_len, seed=seed)
    extra["model_seconds"] = time.perf_counter() - t0
    name = f"model_{eval_cfg.mode}"
    preds[name] = preds_runs
    io.write_jsonl(out_dir / f"trajectories_{name}.jsonl", [t.to_json() for t in traj])
    trajectories.extend(traj)

  if eval_cfg.imagining:
    im_preds, im_traj, extra["imagining"] = evaluate_imagining(
        graphdef, params, tokenizer, built_examples, questions, eval_cfg,
        prompt_len=prompt_len, out_dir=out_dir)
    preds.update(im_preds)
    trajectories.extend(im_traj)

  results, strict = {}, {}
  for name, runs in preds.items():
    predictions.write_runs(out_dir, name, runs)
    results[name] = predictions.score_predictions(questions, runs)
    strict[name] = predictions.score_predictions(questions, runs, strict=True)
  for name in ("model_imagining", "copy_anchors"):
    if name in results:
      results[name]["overall"]["imagining"] = extra["imagining"][name]

  pair_results, pair_strict = {}, {}
  if eval_cfg.pair_eval:
    pair_results, pair_strict, extra["pairs"] = evaluate_pairs(
        graphdef, params, tokenizer, built_examples, eval_cfg, prompt_len=prompt_len,
        out_dir=out_dir)

  io.write_json(out_dir / "results.json",
                {"results": {**results, **pair_results}, "strict": {**strict, **pair_strict},
                 "eval_source": source, **extra}, indent=2, sort_keys=True)
  report.write_report(workdir / "report", report.pairs_apart({**results, **pair_results}),
                      metrics_logs, trajectories,
                      strict=report.pairs_apart({**strict, **pair_strict}),
                      traces_files=eval_cfg.traces)
  print(f"{source}, the benchmark's scoring ({len(questions)} questions; "
        f"prediction files in {out_dir}):\n")
  print(report.format_table(results))
  print("Strict: every question; a missing or unparseable answer or a tie is wrong:\n")
  print(report.format_table(strict))
  failures = {n: r["overall"]["failures"] for n, r in results.items() if r["overall"]["failures"]}
  if failures:
    print(f"Failures (summed over runs): {failures}\n")
  for name, st in extra.get("imagining", {}).items():
    print(imagining_line(name, st))
  if extra.get("imagining"):
    print()
  if pair_results:
    p = extra["pairs"]
    print(f"Counterfactual pairs (eval split): baselines on all {p['eval_pairs']} pairs "
          f"(trained on {p['train_pairs']} {'+'.join(p['train_splits'])} pairs), model on "
          f"{p.get('model_pairs', 0)}; skipped {p['skipped']}\n")
    print(report.format_table(pair_results))
  return {**results, **pair_results}
