"""The build's examples made, split, checked and written one at a time, in worker processes.

Nothing is held: each example goes to its split's JSON-lines file as it is made. The
stream, in the build's order, is cut into segments (the questions; the natural pairs;
the cross-trial pairs of each run of QUESTION_CHUNK questions; the ready-made examples;
each question and pair followed by its per-arm operator example, if any: arm_examples);
each segment is written by a worker process (forked, so the questions and anchors are
shared, not copied) to its own folder `part-<i>/<split>.jsonl`, and a split's examples
are the parts' files read in order (`Written.lines`): the files do not depend on the
number of workers. Every example kept is checked (split, leakage, time rule) on trial ids,
merged over the parts; a failed check raises once the last part is written.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import multiprocessing
import os
import pathlib
import sys
import warnings
from typing import Iterable, Iterator, Sequence

from data_pipeline import anchors, io, pairs, splits, templates
from data_pipeline.build_report import BuildReport
from data_pipeline.example import PAIR_KINDS, Example

QUESTION_CHUNK = 2048  # targets whose cross-trial pairs are one segment
WORKERS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count() or 1))


@dataclasses.dataclass
class Pairing:
  """What pairing starts from: questions with facts and public dates, ready-made examples
  (synthetic), every question's anchors, the eval trials and the trial splits."""
  questions: list[Example]
  ready: list[Example]
  found: anchors.AnchorSet
  eval_ids: set[str]
  split_of: splits.TrialSplits


Segment = tuple[str, int, int]  # (questions | natural | cross | ready, first, stop question)


def segments(p: Pairing) -> list[Segment]:
  n, chunk = len(p.questions), QUESTION_CHUNK
  return ([("questions", 0, n), ("natural", 0, n)]
          + [("cross", a, min(a + chunk, n)) for a in range(0, n, chunk)] + [("ready", 0, 0)])


def _unrendered(p: Pairing, seg: Segment, factor_order: Sequence[str], max_anchors: int,
                report: BuildReport) -> Iterator[Example]:
  what, first, stop = seg
  if what == "questions":
    for q in p.questions:
      yield q
      yield from arm_examples(q)
  elif what == "natural":
    for pair in pairs.iter_natural_pairs(p.questions, report, max_anchors=max_anchors):
      yield pair
      yield from arm_examples(pair)
  elif what == "cross":
    for q in p.questions[first:stop]:
      for pair in pairs.cross_trial_pairs(q, p.found.anchors.get(q.id, ()), factor_order,
                                          report):
        yield pair
        yield from arm_examples(pair)
  else:
    yield from p.ready


def arm_examples(ex: Example) -> Iterator[Example]:
  """The per-arm operators' training examples `ex` gives (none, or one): a question with
  both arms' values -> an `arm_compare`; a pair (natural or cross-trial) with at most one
  differing factor and values on both sides -> an `arm_estimate`. Held-out splits drop
  them (splits.drop_reason)."""
  if not templates.has_arm_values(ex):
    return
  unrendered = dict(prompt="", completion="", prompt_fields_cut=0)
  if ex.kind == "question":
    yield ex.replace(id=f"arm_compare:{ex.id}", kind="arm_compare", facts=None, **unrendered)
  elif (ex.kind in PAIR_KINDS and ex.anchor is not None and len(ex.factors) <= 1
        and templates.has_arm_values(ex.anchor)):
    yield ex.replace(id="arm_estimate:" + ex.id.partition(":")[2], kind="arm_estimate",
                     **unrendered)


def _rendered(examples: Iterable[Example], report: BuildReport) -> Iterator[Example]:
  for ex in examples:
    if not ex.prompt:
      try:
        ex = templates.render(ex)
      except ValueError as e:
        report.add_skip("render", type(e).__name__, f"{ex.id}: {str(e)[:80]}")
        continue
    yield ex


def iter_examples(p: Pairing, factor_order: Sequence[str], max_anchors: int,
                  report: BuildReport) -> Iterator[Example]:
  """Every example, rendered, one at a time in the build's order: the questions, the
  natural pairs, each question's cross-trial pairs, the ready-made examples. One that
  cannot be rendered is counted under 'render' and skipped."""
  for seg in segments(p):
    yield from _rendered(_unrendered(p, seg, factor_order, max_anchors, report), report)


class Checked:
  """Splits examples (splits.split_or_drop, drops counted) and keeps what the checks need
  of those kept: trial ids (splits.LeakageCheck) and the ids of pairs that break the time
  rule. Parts checked apart are merged before `check`."""

  def __init__(self, split_of: splits.TrialSplits, report: BuildReport):
    self.split_of, self.report = split_of, report
    self.leakage, self.late = splits.LeakageCheck(), []

  def __call__(self, examples: Iterable[Example]) -> Iterator[tuple[str, Example]]:
    for ex in examples:
      split = splits.split_or_drop(ex, self.split_of, self.report)
      if not split:
        continue
      self.leakage.add(split, ex)
      if anchors.breaks_time_rule(ex):
        self.late.append(ex.id)
      yield split, ex

  def merge(self, leakage: splits.LeakageCheck, late: Sequence[str]) -> None:
    self.leakage.merge(leakage)
    self.late.extend(late)

  def check(self) -> None:
    """Raises if a kept example lets training see a held-out trial (LeakageError) or has
    an anchor not public before its target's cutoff (AssertionError)."""
    self.leakage.check()
    anchors.time_rule_error(self.late)


def split_checked(examples: Iterable[Example], split_of: splits.TrialSplits,
                  report: BuildReport) -> Iterator[tuple[str, Example]]:
  """(split, example) for each example kept; when the examples run out, raises if a check
  fails (Checked.check): the checks cover everything, on trial ids, not held examples."""
  checked = Checked(split_of, report)
  yield from checked(examples)
  checked.check()


def example_line(ex: Example, split: str = "") -> str:
  """Example.to_json as one sorted JSON line, `split` set when given (no copy of the
  Example: a build writes millions)."""
  rec = io.dataclass_record(ex)
  if split:
    rec["split"] = split
  return _ENCODER.encode(rec)


_ENCODER = json.JSONEncoder(ensure_ascii=False, sort_keys=True)  # json.dumps makes one a call


def write_splits(kept: Iterable[tuple[str, Example]], directory: pathlib.Path
                 ) -> dict[str, int]:
  """Each (split, example) written as it comes to directory/<split>.jsonl (nothing held);
  returns {split: examples written}. An exception (a failed check) leaves no file."""
  directory.mkdir(parents=True, exist_ok=True)
  with contextlib.ExitStack() as stack:
    writers: dict[str, io.JsonlWriter] = {}
    for split, ex in kept:
      if split not in writers:
        writers[split] = stack.enter_context(io.JsonlWriter(directory / f"{split}.jsonl"))
      writers[split].write_line(example_line(ex, split))
    return {s: w.lines for s, w in writers.items()}


def read_lines(path: pathlib.Path) -> Iterator[str]:
  """The lines of a JSON-lines file the build wrote, without their newlines."""
  if path.is_file():
    with open(path, encoding="utf-8") as f:
      for line in f:
        yield line.rstrip("\n")


@dataclasses.dataclass
class Written:
  """The parts a streamed build wrote, in order, and the examples per split."""
  parts: list[pathlib.Path]
  sizes: dict[str, int]

  def lines(self, split: str) -> Iterator[str]:
    """The split's JSON lines, in the build's order."""
    for part in self.parts:
      yield from read_lines(part / f"{split}.jsonl")

  def texts(self, names: Sequence[str]) -> Iterator[str]:
    """Prompts and completions of the named splits (a tokenizer's corpus)."""
    for s in names:
      for line in self.lines(s):
        rec = json.loads(line)
        yield rec["prompt"]
        yield rec["completion"]


_JOB: tuple = ()  # (Pairing, factor_order, max_anchors, directory): inherited by forked workers


def _write_segment(i: int) -> tuple:
  p, factor_order, max_anchors, directory = _JOB
  report = BuildReport()
  checked = Checked(p.split_of, report)
  seg = segments(p)[i]
  sizes = write_splits(
      checked(_rendered(_unrendered(p, seg, factor_order, max_anchors, report), report)),
      directory / f"part-{i:05d}")
  return sizes, report, checked.leakage, checked.late


def _jax_distributed() -> bool:
  """Whether this process has started jax.distributed (a gRPC client or service)."""
  if "jax" not in sys.modules:
    return False
  from jax._src import distributed  # no public query; the launcher's multihost runs set it
  return distributed.global_state.client is not None or distributed.global_state.service \
      is not None


def write_examples(p: Pairing, factor_order: Sequence[str], max_anchors: int,
                   report: BuildReport, directory: pathlib.Path, workers: int | None = None
                   ) -> Written:
  """Every example (iter_examples' stream) split, checked and written under `directory`,
  by `workers` forked processes (default WORKERS; 1: in this one); counts merged into
  `report`. Raises after writing if a check fails (Checked.check)."""
  global _JOB
  workers = WORKERS if workers is None else workers
  if workers > 1 and _jax_distributed():
    # gRPC's threads (jax.distributed) do not survive a fork: a child can abort the whole
    # process (seen as a SIGABRT in the 2-process launcher tests). Build in this process.
    logging.info("build_stream: jax.distributed is up, so the examples are written in "
                 "this process (no forked workers)")
    workers = 1
  n = len(segments(p))
  checked = Checked(p.split_of, report)
  sizes: dict[str, int] = {}
  _JOB = (p, tuple(factor_order), max_anchors, directory)
  try:
    with contextlib.ExitStack() as stack:
      if workers > 1:
        gc.freeze()  # the workers share the parent's objects; a collection would copy them
        stack.callback(gc.unfreeze)
        # JAX warns that a fork may deadlock if the child calls into it; the workers only
        # render and write Python records and exit without running JAX's atexit hooks.
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*use of fork", category=DeprecationWarning)
        pool = stack.enter_context(multiprocessing.get_context("fork").Pool(workers))
        results = pool.imap(_write_segment, range(n))
      else:
        results = map(_write_segment, range(n))
      for part_sizes, part_report, leakage, late in results:  # in segment order
        report.merge(part_report)
        checked.merge(leakage, late)
        for s, k in part_sizes.items():
          sizes[s] = sizes.get(s, 0) + k
  finally:
    _JOB = ()
  checked.check()
  return Written([directory / f"part-{i:05d}" for i in range(n)], sizes)
