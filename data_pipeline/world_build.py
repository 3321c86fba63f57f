"""The world's examples and splits that test transfer, written as a build (BuiltData).

Why a build of its own: the real-data build reads files and hashes trials into
splits; the world needs two held-out sets chosen by the mechanism. Everything
else is the project's stages, unchanged: questions.derive_questions, facts,
anchors.find_anchors (similar, time-respecting, training trials only), pairs
(natural_pairs, cross_trial_pairs), the per-arm operators' examples
(build_stream.arm_examples), templates, splits.assign_splits (held-out
trials are its `eval`; natural pairs and held-out anchors dropped and counted) and
splits.assert_no_leakage. Held-out splits:
  test_combo  trials with a (drug, condition) combination that no training trial has,
              in any arm (comparators included);
  test_dose   other trials with a dose of a drug that no training trial gives.
Every other trial is hashed into train / rl / dev (world.dev_fraction, rl_fraction).
"""
from __future__ import annotations

import collections
import os
import pathlib
from typing import Sequence

from data_pipeline import anchors, build_stream, facts, io, pairs, questions, splits, templates
from data_pipeline.build import BuiltData, TrainTokenizer, label_balance
from data_pipeline.build_report import BuildReport
from data_pipeline.example import Example
from data_pipeline.world import World, WorldConfig

HELDOUT_SPLITS = ("test_combo", "test_dose")
SPLITS = ("train", "rl", "dev") + HELDOUT_SPLITS
TRAINING = splits.TRAINING
# The CT Open category each derived question type belongs to (metrics.category_of).
META_LABELS = {"superiority": "distinguishable_arm", "comparative": "distinguishable_arm",
               "endpoint_met": "no_arm"}


class HeldOutLeakError(AssertionError):
  """A held-out combination or dose appears in a training example; the message names it."""


def heldout_split_of(world: World) -> dict[str, str]:
  """trial id -> test_combo / test_dose for the held-out trials (others are absent)."""
  m = world.mechanism
  out = {}
  for t in world.trials:
    _, c = world.combo_of[t.id]
    plans = [p for p in world.arm_plans[t.id].values() if p.drug >= 0]
    if any((p.drug, c) in m.heldout_combos for p in plans):
      out[t.id] = "test_combo"
    elif any(p.dose_mg in m.heldout_doses[p.drug] for p in plans):
      out[t.id] = "test_dose"
  return out


def world_questions(world: World, report: BuildReport) -> list[Example]:
  """CT Open-style questions of every trial, with their CT Open category."""
  out = []
  for q in questions.derive_all(world.trials, report):
    meta = META_LABELS[q.question_type]
    out.append(q.replace(meta_label=meta, category=f"{q.n_options}-way/" + (
        "implicit" if meta == "no_arm" else "explicit")))
  return out


def build_examples(world: World, cfg: WorldConfig, *, anchors_k: int, retriever: str,
                   max_anchors: int, report: BuildReport) -> tuple[dict, dict]:
  """({split: [rendered Example]}, anchor coverage per split) for the world."""
  trials = {t.id: t for t in world.trials}
  held = heldout_split_of(world)
  qs = anchors.with_public_dates(facts.attach_facts(world_questions(world, report), trials),
                                 trials)
  split_of = splits.TrialSplits(cfg.seed, dev_fraction=cfg.dev_fraction,
                                rl_fraction=cfg.rl_fraction, eval_trial_ids=held)
  found = anchors.find_anchors(qs, trials, split_of, k=anchors_k, retriever=retriever)
  made = list(qs) + pairs.natural_pairs(qs, report, max_anchors=max_anchors)
  for q in qs:
    made += pairs.cross_trial_pairs(q, found.anchors.get(q.id, ()), facts.FACTORS, report)
  # each with the per-arm operators' example it gives (training splits only)
  examples = [templates.render(x) if not x.prompt else x
              for ex in made for x in (ex, *build_stream.arm_examples(ex))]
  by_split = splits.assign_splits(examples, cfg.seed, dev_fraction=cfg.dev_fraction,
                                  rl_fraction=cfg.rl_fraction, eval_trial_ids=held,
                                  report=report)
  splits.assert_no_leakage(by_split)
  anchors.assert_time_respecting([ex for exs in by_split.values() for ex in exs])
  out = {s: list(by_split.get(s, ())) for s in SPLITS if s not in HELDOUT_SPLITS}
  for s in HELDOUT_SPLITS:
    out[s] = [ex.replace(split=s) for ex in by_split.get("eval", ()) if held[ex.trial_id] == s]
  assert_heldout(world, out)
  return out, found.coverage


def assert_heldout(world: World, by_split: dict[str, Sequence[Example]]) -> None:
  """Raises HeldOutLeakError if a training example's target or anchor trial has a
  held-out (drug, condition) in any arm or a held-out dose of a drug."""
  m = world.mechanism
  problems = []
  for split in TRAINING:
    for ex in by_split.get(split, ()):
      for tid in {ex.trial_id, ex.anchor_trial_id} - {""}:
        _, c = world.combo_of[tid]
        for label, p in world.arm_plans[tid].items():
          if p.drug < 0:
            continue
          if (p.drug, c) in m.heldout_combos:
            problems.append(f"{split} {ex.id}: trial {tid} arm {label!r} is a held-out "
                            f"combination ({m.drugs[p.drug]}, {m.conditions[c]})")
          elif p.dose_mg in m.heldout_doses[p.drug]:
            problems.append(f"{split} {ex.id}: trial {tid} arm {label!r} is a held-out dose")
  if problems:
    raise HeldOutLeakError(f"{len(problems)} held-out leaks: " + "; ".join(problems[:5]))


def write_build(by_split: dict[str, Sequence[Example]], out_dir: str | os.PathLike, *,
                train_tokenizer: TrainTokenizer, vocab_size: int, report: dict) -> BuiltData:
  """Writes examples/<split>.jsonl, the tokenizer (trained on the non-held-out splits)
  and report.json, in the layout BuiltData reads."""
  out = pathlib.Path(out_dir)
  for s, exs in by_split.items():
    io.write_jsonl(out / "examples" / f"{s}.jsonl", (ex.to_json() for ex in exs),
                   sort_keys=True)
  texts = [t for s, exs in by_split.items() if s not in HELDOUT_SPLITS
           for ex in exs for t in (ex.prompt, ex.completion)]
  tok = train_tokenizer(texts, out / "tokenizer", vocab_size)
  report = {**report, "tokenizer_vocab_size": tok.vocab_size,
            "split_sizes_by_kind": {s: dict(collections.Counter(ex.kind for ex in exs))
                                    for s, exs in by_split.items()},
            "label_balance": {s: label_balance([ex for ex in exs if ex.kind == "question"])
                              for s, exs in by_split.items()}}
  io.write_json(out / "report.json", report, indent=1, sort_keys=True)
  return BuiltData(out, out / "tokenizer" / "tokenizer.model", report, tuple(by_split))
