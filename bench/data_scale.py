"""Data build cost vs number of trials: does it grow linearly?

  python bench/data_scale.py [--sizes 1000,10000,50000] [--retriever tfidf]
  python bench/data_scale.py --profile 10000   (cProfile of one size, top functions)

Trials come from the project's trial world (data_pipeline/world.py, configs/world.py's
declared values) with more drugs and conditions as the size grows, cut to exactly the
size asked. Each size runs in its own subprocess, so its peak memory (ru_maxrss) is its
own; the stages are the build's: questions (what a reader yields) -> facts and public
dates -> anchors (retrieval under the time rule) -> pairs (natural and cross-trial,
rendered) -> render (questions) -> splits (leakage and time-rule checks). Prints one
line: per size, build seconds, peak RSS, examples, and each stage's share of the time;
then the growth exponent (log-log slope of build seconds vs trials) between sizes, of wall
and of CPU seconds (the machine's 2 cores are shared, so wall seconds carry others' load).
World generation is timed apart (it is not the build).
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import itertools
import json
import math
import pathlib
import pstats
import resource
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import common  # noqa: E402
from configs import world as world_config  # noqa: E402
from data_pipeline import anchors, facts, pairs, splits, templates, world_build  # noqa: E402
from data_pipeline.build_report import BuildReport  # noqa: E402
from data_pipeline.world import World, WorldConfig, generate_world  # noqa: E402

STAGES = ("questions", "facts", "anchors", "pairs", "render", "splits")
DATA = common.data()  # the build's declared anchors_k, max_anchors, factor_order


def scaled_config(n_trials: int) -> WorldConfig:
  """configs/world.py's world with drugs and conditions grown (2 drugs a condition) so
  that its combinations hold at least n_trials trials (about 1.25x, then cut)."""
  declared = WorldConfig(**dict(world_config.get_config().world))
  per_combo = declared.trials_per_combo * declared.combo_fraction
  n_conditions = max(2, round(math.sqrt(n_trials / per_combo / 2)))
  n_drugs = max(3, math.ceil(1.25 * n_trials / per_combo / n_conditions))
  return dataclasses.replace(declared, n_conditions=n_conditions, n_drugs=n_drugs)


def make_world(n_trials: int) -> World:
  world = generate_world(scaled_config(n_trials))
  if len(world.trials) < n_trials:
    raise RuntimeError(f"the scaled world has {len(world.trials)} trials, fewer than "
                       f"{n_trials}: raise the margin in scaled_config")
  return dataclasses.replace(world, trials=world.trials[:n_trials])


def build(world: World, cfg: WorldConfig, retriever: str) -> tuple[dict, dict]:
  """The build's stages on the world, each timed: ({stage: seconds}, counts)."""
  seconds, report = {}, BuildReport()
  clock = [time.perf_counter()]

  def lap(stage):
    now = time.perf_counter()
    seconds[stage] = now - clock[0]
    clock[0] = now

  trials = {t.id: t for t in world.trials}
  held = world_build.heldout_split_of(world)
  qs = world_build.world_questions(world, report)
  lap("questions")
  qs = anchors.with_public_dates(facts.attach_facts(qs, trials), trials)
  lap("facts")
  split_of = splits.TrialSplits(cfg.seed, dev_fraction=cfg.dev_fraction,
                                rl_fraction=cfg.rl_fraction, eval_trial_ids=held)
  found = anchors.find_anchors(qs, trials, split_of, k=DATA.anchors_k, retriever=retriever)
  lap("anchors")
  examples = pairs.natural_pairs(qs, report, max_anchors=DATA.max_anchors)
  for q in qs:
    examples += pairs.cross_trial_pairs(q, found.anchors.get(q.id, ()), DATA.factor_order, report)
  lap("pairs")
  examples += [templates.render(q) for q in qs]
  lap("render")
  by_split = splits.assign_splits(examples, cfg.seed, dev_fraction=cfg.dev_fraction,
                                  rl_fraction=cfg.rl_fraction, eval_trial_ids=held,
                                  report=report)
  splits.assert_no_leakage(by_split)
  anchors.assert_time_respecting([ex for exs in by_split.values() for ex in exs])
  lap("splits")
  counts = {"questions": len(qs), "examples": sum(len(v) for v in by_split.values()),
            "cross_trial": sum(ex.anchor_trial_id not in ("", ex.trial_id) for ex in examples)}
  return seconds, counts


def child(n_trials: int, retriever: str) -> dict:
  """One size, in this process: what the parent prints."""
  t0 = time.perf_counter()
  world = make_world(n_trials)
  world_s = time.perf_counter() - t0
  cpu0 = time.process_time()
  seconds, counts = build(world, scaled_config(n_trials), retriever)
  cpu_s = time.process_time() - cpu0  # beside wall seconds: the 2 cores are shared
  peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  return {"trials": n_trials, "world_s": world_s, "stages": seconds,
          "build_s": sum(seconds.values()), "cpu_s": cpu_s, "peak_gb": peak_kb / 2**20, **counts}


def run_size(n_trials: int, retriever: str) -> dict:
  out = subprocess.run([sys.executable, __file__, "--child", str(n_trials),
                        "--retriever", retriever], capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f"size {n_trials} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def line(rows: list[dict], retriever: str) -> str:
  parts = []
  for r in rows:
    shares = " ".join(f"{s} {r['stages'][s] / r['build_s']:.0%}" for s in STAGES)
    parts.append(f"{r['trials']} trials: build {r['build_s']:.1f} s (cpu {r['cpu_s']:.1f} s), "
                 f"peak {r['peak_gb']:.2f} GB, {r['questions'] / r['trials']:.1f} questions/trial, "
                 f"{r['examples']} examples ({r['cross_trial']} cross-trial) [{shares}]; "
                 f"world {r['world_s']:.1f} s")
  def slope(a, b, key):
    return math.log(b[key] / a[key]) / math.log(b["trials"] / a["trials"])

  slopes = [f"{a['trials']}->{b['trials']} {slope(a, b, 'build_s'):.2f} "
            f"(cpu {slope(a, b, 'cpu_s'):.2f})" for a, b in itertools.pairwise(rows)]
  return (f"data_scale ({retriever}, k={DATA.anchors_k}): " + " | ".join(parts)
          + (" | growth exponent " + ", ".join(slopes) if slopes else ""))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="1000,10000,50000", help="trial counts, comma-separated")
  p.add_argument("--retriever", default="tfidf", choices=("tfidf", "bm25"))
  p.add_argument("--profile", type=int, default=0, help="cProfile one size in this process")
  p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.child:
    print(json.dumps(child(a.child, a.retriever)))
    return
  if a.profile:
    world = make_world(a.profile)
    prof = cProfile.Profile()
    prof.runcall(build, world, scaled_config(a.profile), a.retriever)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
    return
  sizes = [int(s) for s in a.sizes.split(",")]
  print(line([run_size(n, a.retriever) for n in sizes], a.retriever))


if __name__ == "__main__":
  main()
