"""The world experiment: does learning how results move under one change transfer?

`world(config, workdir)` (configs/world.py) generates the trial world
(data_pipeline.world), builds its examples and held-out splits
(data_pipeline.world_build), then trains, for each seed and at equal compute
(the same optimizer steps of the same number of sequences, packed to the same
length), the arms:
  questions  SFT on the training questions;
  pairs      SFT on the training questions and natural pairs;
  grpo       the pairs arm's SFT for steps - rl_steps, then GRPO for rl_steps on
             cross-trial pairs (rl.kinds: approximate pairs, one factor apart, and
             chains, several; prompts_per_step x group_size = the SFT batch);
  imagining  the grpo model, answering by stepwise imagining from anchors
             (eval.imagining, walks of eval.walk; a target without a finished walk
             keeps its direct answer, counted);
  arms       SFT on the questions, natural pairs and the per-arm operators'
             examples (arm_estimate: an anchor's arm values + one change -> the
             target's; arm_compare: arm values -> the decision), answering directly;
  arm_walks  the arms model, answering by per-arm walks from anchors (eval/imagining.py
             walk "per_arm": each step writes the two arms' values, the last
             values are compared; the direct answer where no walk finishes, counted).
Every arm answers the held-out questions of each split by scoring
(eval.scoring); references are the per-category majority, copy-the-anchor and
TF-IDF LR / RF without and with anchor features (eval.baselines; a target
without a usable anchor pair keeps the text-only answer, counted). Metrics are
the benchmark's (eval.metrics), averaged over seeds, with bootstrap intervals
over the held-out questions. Writes <workdir>/report/world.{md,json,png}.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import time
from io import BytesIO
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from data_pipeline import io, world_build
from data_pipeline.build_report import BuildReport
from data_pipeline.example import Example
from data_pipeline.world import WorldConfig, generate_world
from deepimagine_jax import jobs, sharding
from deepimagine_jax.config import OptimizerConfig, RunConfig
from deepimagine_jax.eval import baselines, imagining, metrics, scoring
from deepimagine_jax.tokenizer import Tokenizer

ARMS = ("questions", "pairs", "grpo", "imagining", "arms", "arm_walks")
SFT_KINDS = {"questions": ("question",), "pairs": ("question", "natural_pair"),
             "grpo": ("question", "natural_pair"),
             "arms": ("question", "natural_pair", "arm_estimate", "arm_compare")}
TRAINED = tuple(SFT_KINDS)  # the arms with a model of their own
WALKED = {"grpo": "imagining", "arms": "arm_walks"}  # model arm -> the arm of its walks
REFERENCES = ("majority", "copy_anchor", "logreg_tfidf", "logreg_tfidf+anchor",
              "random_forest_tfidf", "random_forest_tfidf+anchor")
SHOWN = ("balanced_accuracy", "macro_f1", "cross_entropy")
CROSS_TRIAL = ("approximate_pair", "chain")  # an anchor from another trial, one step or more


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """The `experiment` config section (configs/world.py)."""
  seeds: int
  steps: int
  rl_steps: int
  anchors_k: int
  retriever: str
  bootstrap: int
  ci: float
  splits: tuple[str, ...]

  def __post_init__(self):
    if not 0 <= self.rl_steps < self.steps:
      raise ValueError(f"experiment.rl_steps must be in [0, steps={self.steps}), "
                       f"got {self.rl_steps}")
    if self.seeds < 1 or self.bootstrap < 1 or not 0 < self.ci < 1:
      raise ValueError(f"experiment: seeds and bootstrap must be >= 1 and ci in (0, 1), got "
                       f"{self.seeds}, {self.bootstrap}, {self.ci}")
    bad = set(self.splits) - set(world_build.HELDOUT_SPLITS)
    if bad:
      raise ValueError(f"experiment.splits: {sorted(bad)} are not held-out splits "
                       f"{world_build.HELDOUT_SPLITS}")


def build(run: RunConfig, wcfg: WorldConfig, exp: ExperimentConfig, out_dir: str):
  """(BuiltData, World): the world, its examples and a tokenizer trained on the training splits."""
  t0 = time.time()
  world = generate_world(wcfg)
  report = BuildReport()
  by_split, coverage = world_build.build_examples(
      world, wcfg, anchors_k=exp.anchors_k, retriever=exp.retriever,
      max_anchors=run.data.max_anchors, report=report)
  m = world.mechanism
  info = {"trials": len(world.trials), "combinations": len(m.combos),
          "heldout_combinations": sorted(f"{m.drugs[d]} / {m.conditions[c]}"
                                         for d, c in m.heldout_combos),
          "anchor_coverage": coverage, "counts": report.to_dict(),
          "split_sizes": {s: len(v) for s, v in by_split.items()}}
  built = world_build.write_build(by_split, out_dir, train_tokenizer=Tokenizer.train,
                                  vocab_size=run.data.vocab_size, report=info)
  logging.info("world build: %s in %.1f s", info["split_sizes"], time.time() - t0)
  return built, world


def arm_config(run: RunConfig, arm: str, seed: int, exp: ExperimentConfig) -> RunConfig:
  """The run of one arm: its SFT kinds and steps (and GRPO steps), the optimizer over them."""
  sft_steps = exp.steps - (exp.rl_steps if arm == "grpo" else 0)

  def stage(section, steps):
    opt = OptimizerConfig.for_run(dataclasses.asdict(section.optimizer), steps)
    return dataclasses.replace(section, loop=dataclasses.replace(section.loop, steps=steps),
                               optimizer=opt)

  sft = dataclasses.replace(stage(run.sft, sft_steps), kinds=SFT_KINDS[arm])
  rl = stage(run.rl, exp.rl_steps) if arm == "grpo" else run.rl
  return dataclasses.replace(run, seed=seed, sft=sft, rl=rl)


def train_arm(run: RunConfig, arm: str, workdir: str, built, tokenizer, mesh):
  """(graphdef, params) of one arm (jobs.run_sft_stage, then jobs.run_grpo_stage for "grpo")."""
  sft_dir = os.path.join(workdir, "sft")
  graphdef, params = jobs.run_sft_stage(run, sft_dir, built, tokenizer, mesh)
  if arm != "grpo":
    return graphdef, params
  state = jobs.run_grpo_stage(run, workdir, built, tokenizer, mesh, graphdef, params, sft_dir)
  return graphdef, state.params


def nearest_pairs(targets: Sequence[Example], pairs: Sequence[Example]) -> dict[str, Example]:
  """target id -> its nearest usable cross-trial pair or chain (anchors come nearest first)."""
  out: dict[str, Example] = {}
  for p in pairs:
    if p.kind not in CROSS_TRIAL:
      continue
    target_id = imagining.chain_target_id(p)
    if target_id not in out and not baselines.pair_problem(p):
      out[target_id] = p
  return {t.id: out[t.id] for t in targets if t.id in out}


def reference_runs(train_q, train_pairs, targets, split_pairs, rf_seeds, folds: int):
  """{reference: runs of probabilities over targets}.

  The anchor references answer targets that have a usable anchor pair; the rest
  keep the answer of the same learner without anchors (majority for copy_anchor).
  Every learner is chosen (cross-validated) and fitted once on the training data,
  whatever the targets: pass all scored splits' targets together and slice.
  """
  runs, _ = baselines.baseline_probs(train_q, targets, rf_seeds, folds)
  near = nearest_pairs(targets, split_pairs)
  anchored = [i for i, t in enumerate(targets) if t.id in near]
  out = {k: runs[k] for k in REFERENCES if k in runs}
  if not anchored:
    for key in REFERENCES:
      out.setdefault(key, runs["majority" if key == "copy_anchor" else key.split("+")[0]])
    return out
  pair_runs, _ = baselines.pair_baselines(train_pairs, [near[targets[i].id] for i in anchored],
                                          rf_seeds, folds)
  for key in REFERENCES:
    if key in out:
      continue
    base = runs["majority" if key == "copy_anchor" else key.split("+")[0]]
    merged = []
    for r, pair_run in enumerate(pair_runs[key]):
      probs = list(base[min(r, len(base) - 1)])
      for i, p in zip(anchored, pair_run):
        probs[i] = p
      merged.append(probs)
    out[key] = merged
  return out


def score(targets: Sequence[Example], runs: Sequence[Sequence[np.ndarray]]) -> dict:
  """Overall metrics of runs (seeds) averaged: the benchmark's categories and mean."""
  return metrics.score_runs(targets, [list(r) for r in runs])["overall"]


def bootstrap(targets: Sequence[Example], runs, reps: int, ci: float, seed: int) -> dict:
  """{metric: (low, high)}: percentile interval of the seed-averaged overall metric when
  the held-out questions are resampled with replacement (the same resample for every seed)."""
  rng = np.random.default_rng(seed)
  draws = {m: [] for m in SHOWN}
  n = len(targets)
  for _ in range(reps):
    idx = rng.integers(0, n, n)
    m = score([targets[i] for i in idx], [[r[i] for i in idx] for r in runs])
    for k in SHOWN:
      draws[k].append(m[k])
  q = (1 - ci) / 2
  return {k: (float(np.nanquantile(v, q)), float(np.nanquantile(v, 1 - q)))
          for k, v in draws.items()}


def _cell(entry: dict, metric: str) -> str:
  lo, hi = entry["ci"][metric]
  return f"{entry[metric]:.3f} [{lo:.3f}, {hi:.3f}]"


def format_table(results: dict, splits: Sequence[str]) -> str:
  """Markdown: one row per arm / reference, per split the three metrics with intervals."""
  head = "| method | " + " | ".join(f"{s} {m}" for s in splits for m in
                                      ("acc", "macro-F1", "CE")) + " |"
  lines = [head, "|" + "---|" * (1 + 3 * len(splits))]
  for name in list(ARMS) + list(REFERENCES):
    cells = [_cell(results[s][name], m) for s in splits for m in SHOWN]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(results: dict, splits: Sequence[str], path: pathlib.Path) -> None:
  """Class-balanced accuracy with its interval, one panel per split."""
  fig = Figure(figsize=(5 * len(splits), 4), dpi=100)
  FigureCanvasAgg(fig)
  names = list(ARMS) + list(REFERENCES)
  for j, s in enumerate(splits):
    ax = fig.add_subplot(1, len(splits), j + 1)
    acc = np.array([results[s][n]["balanced_accuracy"] for n in names])
    lo = np.array([results[s][n]["ci"]["balanced_accuracy"][0] for n in names])
    hi = np.array([results[s][n]["ci"]["balanced_accuracy"][1] for n in names])
    colors = ["C0"] * len(ARMS) + ["C7"] * len(REFERENCES)
    ax.barh(np.arange(len(names)), acc, xerr=[acc - lo, hi - acc], color=colors, capsize=3)
    ax.axvline(0.5, color="k", lw=0.8, ls="--")
    ax.set_yticks(np.arange(len(names)), names if j == 0 else [""] * len(names))
    ax.invert_yaxis()
    ax.set_xlim(0.3, 1.0)
    ax.set_xlabel("class-balanced accuracy")
    ax.set_title(f"{s} (n={results[s]['questions']['n']})")
  out = BytesIO()
  fig.savefig(out, format="png", bbox_inches="tight")
  io.atomic_write(path, out.getvalue())


def estimates_line(q: dict) -> str:
  """imagining.estimate_quality as words: the written values, then the anchor's copied."""
  w, a = q["written"], q["anchor"]
  return (f"; over {q['n']} finished walks from anchors with values, the written values "
          f"(copying the anchor's) have the observed sign of the arms' difference "
          f"{w['sign_agreement']:.3f} ({a['sign_agreement']:.3f}), difference correlation "
          f"{w['diff_correlation']:.3f} ({a['diff_correlation']:.3f}), mean absolute error "
          f"{w['mae']:.3f} ({a['mae']:.3f})")


def world(config, workdir: str):
  """The experiment job (configs/world.py): build, the arms x seeds, references, report."""
  t0 = time.time()
  run = RunConfig.from_config(config)
  wcfg = WorldConfig(**dict(config.world))
  exp = ExperimentConfig(**dict(config.experiment))
  mesh = sharding.mesh_from_config(run.mesh)
  built, _ = build(run, wcfg, exp, os.path.join(workdir, "data"))
  tokenizer = Tokenizer.load(built.tokenizer_path)
  targets = {s: built.examples(s, ("question",)) for s in exp.splits}
  split_examples = {s: built.examples(s) for s in exp.splits}
  probs: dict = {arm: {s: [] for s in exp.splits} for arm in ARMS}
  walk_stats: dict = {name: {s: [] for s in exp.splits} for name in WALKED.values()}
  held_trials = {t.trial_id for s in exp.splits for t in targets[s]}
  for i in range(exp.seeds):
    for arm in TRAINED:
      arm_run = arm_config(run, arm, run.seed + i, exp)
      arm_dir = os.path.join(workdir, f"seed{i}", arm)
      graphdef, params = train_arm(arm_run, arm, arm_dir, built, tokenizer, mesh)
      for s in exp.splits:
        direct = scoring.option_probs_by_scoring(
            graphdef, params, tokenizer, targets[s], prompt_len=run.data.prompt_len,
            batch_size=run.eval.batch_size)
        probs[arm][s].append(scoring.trimmed(direct, targets[s]))
        if arm in WALKED:
          walks = [ex for ex in split_examples[s] if ex.kind in CROSS_TRIAL]
          p, traj, stats = imagining.imagine(
              graphdef, params, tokenizer, targets[s], walks, k=run.eval.imagining_k,
              how=run.eval.aggregate, prompt_len=run.data.prompt_len,
              batch_size=run.eval.batch_size,
              walk="per_arm" if arm == "arms" else run.eval.walk,
              max_new_tokens=run.eval.max_new_tokens, direct_probs=direct,
              exclude_anchor_ids={t.id for t in targets[s]},
              exclude_anchor_trials=held_trials)
          if arm == "arms":  # the values the walks wrote against the observed ones
            stats["estimates"] = imagining.estimate_quality(
                *imagining.written_estimates(traj, targets[s]))
          probs[WALKED[arm]][s].append(scoring.trimmed(p, targets[s]))
          walk_stats[WALKED[arm]][s].append(stats)
      logging.info("world: seed %d arm %s done at %.0f s", i, arm, time.time() - t0)
  train_q = [ex for s in world_build.TRAINING for ex in built.examples(s, ("question",))]
  train_pairs = [ex for s in world_build.TRAINING for ex in built.examples(s, CROSS_TRIAL)
                 if not baselines.pair_problem(ex)]
  # The references are fitted once on the training data and answer every split's targets.
  every_target = [t for s in exp.splits for t in targets[s]]
  all_refs = reference_runs(train_q, train_pairs, every_target,
                            [ex for s in exp.splits for ex in split_examples[s]],
                            run.eval.rf_seeds, run.eval.cv_folds)
  results: dict = {}
  start = 0
  for s in exp.splits:
    part = slice(start, start + len(targets[s]))
    start = part.stop
    refs = {name: [list(r[part]) for r in runs] for name, runs in all_refs.items()}
    anchored = len(nearest_pairs(targets[s], split_examples[s]))
    results[s] = {"questions": {"n": len(targets[s]), "anchored": anchored},
                  **{name: {"stats": st[s]} for name, st in walk_stats.items()}}
    for name, runs in [(a, probs[a][s]) for a in ARMS] + list(refs.items()):
      entry = {k: v for k, v in score(targets[s], runs).items() if k in SHOWN}
      entry["ci"] = bootstrap(targets[s], runs, exp.bootstrap, exp.ci, run.seed)
      entry["runs"] = len(runs)
      results[s][name] = {**results[s].get(name, {}), **entry}
  elapsed = time.time() - t0
  report_dir = pathlib.Path(workdir) / "report"
  table = format_table(results, exp.splits)
  io.write_json(report_dir / "world.json", {"results": results, "seconds": elapsed,
                                            "build": built.report}, indent=1, sort_keys=True)
  plot(results, exp.splits, report_dir / "world.png")
  md = ["# World experiment", "", f"{exp.seeds} seeds x {exp.steps} steps "
        f"({exp.rl_steps} GRPO in grpo / imagining); {elapsed:.0f} s in all.", "",
        f"Cells: metric over seeds [{exp.ci:.0%} bootstrap interval over questions].", "",
        table, "![accuracy](world.png)", "", "Walks (per seed: targets answered through "
        "their anchors, the rest by the model's direct answer; walks that did not finish):", ""]
  for name, by_split in walk_stats.items():
    for s, seeds in by_split.items():
      md += [f"- {name}, {s}, seed {i}: {st['imagined']} of {st['targets']} through anchors, "
             f"{st['fallback']} direct; {st['walks']} walks, failed {st['walks_failed']}"
             + (estimates_line(st["estimates"]) if "estimates" in st else "")
             for i, st in enumerate(seeds)]
  md.append("")
  io.atomic_write(report_dir / "world.md", "\n".join(md))
  print(table)
  print(f"world experiment: {elapsed:.0f} s; report in {report_dir}")
  return results
