"""Data build cost vs number of trials: does it grow linearly?

  python bench/data_scale.py [--sizes 1000,10000,50000] [--retriever tfidf]
  python bench/data_scale.py --profile 10000   (cProfile of one size, top functions)

Trials come from the project's trial world (data_pipeline/world.py, configs/world.py's
declared values) with more drugs and conditions as the size grows, cut to exactly the
size asked. Each size runs in its own subprocess. The stages are the build's: questions
(what a reader yields) -> facts and public dates -> anchors (retrieval under the time
rule) -> stream (build_stream.write_examples, as build_dataset runs it: the questions,
natural and cross-trial pairs made and rendered, split, leakage- and time-rule-checked
and written one JSON line at a time to their split's files, in forked worker processes,
into a temporary folder removed after). Not timed: the tokenizer's training and the
prompts' fitting to its tokens (build_dataset's second pass over the files).
Prints one line: per size, build seconds (wall; CPU of the process and its workers),
peak memory (a bound: this process's peak RSS + workers x the largest worker's, so pages
the forked workers share with it count more than once; sampling PSS cost a core), examples,
GB written, each stage's share of the time; then the growth exponent (log-log slope of
build seconds vs trials) between sizes, of wall and of CPU seconds (the machine's 2 cores
are shared, so wall seconds carry others' load). World generation is timed apart (it is
not the build). `--profile N` runs one size in one process (workers 1) under cProfile.
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
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import common  # noqa: E402
from configs import world as world_config  # noqa: E402
from data_pipeline import anchors, facts, splits, world_build  # noqa: E402
from data_pipeline import build_stream  # noqa: E402
from data_pipeline.build_report import BuildReport  # noqa: E402
from data_pipeline.world import World, WorldConfig, generate_world  # noqa: E402

STAGES = ("questions", "facts", "anchors", "stream")
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


def build(world: World, cfg: WorldConfig, retriever: str, out_dir: pathlib.Path,
          workers: int | None = None) -> tuple[dict, dict]:
  """The build's stages on the world, each timed, the examples streamed to out_dir's split
  files by build_stream.write_examples as build_dataset streams them: ({stage: seconds},
  counts)."""
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
  pairing = build_stream.Pairing(qs, [], found, set(held), split_of)
  written = build_stream.write_examples(pairing, DATA.factor_order, DATA.max_anchors, report,
                                        out_dir, workers)
  lap("stream")
  counts = {"questions": len(qs), "examples": sum(written.sizes.values()),
            "cross_trial": sum(n for k, n in report.read.items()
                               if k.startswith(("pairs:approximate_pair:", "pairs:chain:"))),
            "written_gb": sum(f.stat().st_size for f in out_dir.rglob("*.jsonl")) / 2**30}
  return seconds, counts


def child(n_trials: int, retriever: str, workers: int | None) -> dict:
  """One size, in this process (and its workers): what the parent prints."""
  t0 = time.perf_counter()
  world = make_world(n_trials)
  world_s = time.perf_counter() - t0
  cpu0, kids0 = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
  with tempfile.TemporaryDirectory(prefix="data_scale-") as out:
    seconds, counts = build(world, scaled_config(n_trials), retriever, pathlib.Path(out),
                            workers)
  kids = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu_s = (time.process_time() - cpu0 + kids.ru_utime - kids0.ru_utime + kids.ru_stime
           - kids0.ru_stime)  # beside wall seconds: the 2 cores are shared
  workers = workers or build_stream.WORKERS
  self_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
  worker_gb = kids.ru_maxrss / 2**20 if workers > 1 else 0.0  # the largest worker's
  return {"trials": n_trials, "world_s": world_s, "stages": seconds,
          "build_s": sum(seconds.values()), "cpu_s": cpu_s, "workers": workers,
          "self_gb": self_gb, "peak_gb": self_gb + workers * worker_gb, **counts}


def run_size(n_trials: int, retriever: str, workers: int) -> dict:
  out = subprocess.run([sys.executable, __file__, "--child", str(n_trials), "--retriever",
                        retriever, "--workers", str(workers)], capture_output=True, text=True,
                       check=False)
  if out.returncode:
    raise RuntimeError(f"size {n_trials} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def line(rows: list[dict], retriever: str) -> str:
  parts = []
  for r in rows:
    shares = " ".join(f"{s} {r['stages'][s] / r['build_s']:.0%}" for s in STAGES)
    parts.append(f"{r['trials']} trials: build {r['build_s']:.1f} s (cpu {r['cpu_s']:.1f} s, "
                 f"{r['workers']} workers), peak <= {r['peak_gb']:.2f} GB (this process "
                 f"{r['self_gb']:.2f}), "
                 f"{r['questions'] / r['trials']:.1f} questions/trial, "
                 f"{r['examples']} examples ({r['cross_trial']} cross-trial, "
                 f"{r['written_gb']:.1f} GB written) [{shares}]; "
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
  p.add_argument("--workers", type=int, default=0,
                 help="processes that write the examples (0: build_stream.WORKERS)")
  p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.child:
    print(json.dumps(child(a.child, a.retriever, a.workers or None)))
    return
  if a.profile:
    world = make_world(a.profile)
    prof = cProfile.Profile()
    with tempfile.TemporaryDirectory(prefix="data_scale-") as out:  # in one process: all seen
      prof.runcall(build, world, scaled_config(a.profile), a.retriever, pathlib.Path(out), 1)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
    return
  sizes = [int(s) for s in a.sizes.split(",")]
  print(line([run_size(n, a.retriever, a.workers) for n in sizes], a.retriever))


if __name__ == "__main__":
  main()
