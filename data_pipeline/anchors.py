"""Anchors for every target: its k most similar training trials whose results were
public before the target's prediction cutoff.

The time rule: a question's `public_date` is when its result became public (a CT
Open question: its release's cutoff, CT_OPEN_CUTOFFS; a registry question: the
trial's results-first-posted date). A target is predicted as of its own date, so an
anchor must be public strictly before it: a Winter 2025 question can anchor a Summer
2025 target, never another Winter one (both were hidden until the same cutoff), and a
question without a date is never an anchor nor, having no cutoff, a target.

The pool is the questions of training trials (splits.TRAINING: never an eval or dev
trial, never the target's own); the retriever is fitted on the pool's trial texts
only. Retrieval is per trial (the query is the target trial's text) under the time
rule and the option count; from each retrieved trial the anchor is the question
closest to the target: same question type, then the most outcome words shared.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from data_pipeline import retrieval
from data_pipeline.example import Example
from data_pipeline.facts import text_overlap
from data_pipeline.schema import Trial
from data_pipeline.splits import TRAINING

# CT Open's training split is the benchmark's history: its results were all public before
# the Winter 2025 cutoff, so it is dated the day before (it may anchor Winter and Summer
# targets; nothing from Winter on ever anchors it).
CT_OPEN_CUTOFFS = {"Train_2025": "2025-01-31", "Winter_2025": "2025-02-01",
                   "Summer_2025": "2025-09-01"}
OPTION_COUNTS = (2, 3)
_NEVER = np.iinfo(np.int64).max // 2  # a day after every date
QUERY_CHUNK = 1024  # target groups scored at once: [chunk, pool] scores bound memory


def public_date_of(q: Example, trials: Mapping[str, Trial]) -> str:
  """The question's public date ('' when unknown); CT Open reads the release the reader
  put in `split` (call before splits.assign_splits)."""
  if q.source == "ct_open":
    return CT_OPEN_CUTOFFS.get(q.split, "")
  trial = trials.get(q.trial_id)
  return trial.results_posted if trial is not None else ""


def with_public_dates(questions: Sequence[Example], trials: Mapping[str, Trial]
                      ) -> list[Example]:
  """Copies of the questions with `public_date` set (public_date_of)."""
  return [q.replace(public_date=public_date_of(q, trials)) for q in questions]


def time_respecting(anchor_date: str, target_date: str) -> bool:
  """The anchor's result was public strictly before the target's cutoff (ISO dates)."""
  return bool(anchor_date) and bool(target_date) and anchor_date < target_date


def _days(date: str) -> int:
  return int(np.datetime64(date, "D").astype(np.int64)) if date else _NEVER


@dataclasses.dataclass(frozen=True)
class Retrieved:
  """One anchor of a target: the anchor question and its trial's similarity."""
  question: Example
  similarity: float


@dataclasses.dataclass
class AnchorSet:
  """Every target's anchors, the fitted retriever, and coverage per split."""
  anchors: dict[str, list[Retrieved]]  # target question id -> up to k, nearest first
  retriever: retrieval.Retriever | None
  pool_dates: list[str]  # per retriever row: the trial's earliest public date
  coverage: dict  # split -> {targets, with_k, with_any, no_public_date, no_trial_text}


def find_anchors(questions: Sequence[Example], trials: Mapping[str, Trial],
                 split_of: Callable[[str], str], *, k: int, retriever: str,
                 embed: retrieval.Embed | None = None) -> AnchorSet:
  """Up to k time-respecting anchors, one per trial, for every question with a date.

  `questions` carry facts and public dates; `split_of(trial id)` is the build's
  split (splits.TrialSplits): only training trials are anchors.
  """
  pool_by_trial: dict[str, list[Example]] = collections.defaultdict(list)
  for q in questions:
    if q.public_date and q.trial_id in trials and split_of(q.trial_id) in TRAINING:
      pool_by_trial[q.trial_id].append(q)
  pool_ids = sorted(pool_by_trial)
  row_of = {tid: i for i, tid in enumerate(pool_ids)}
  # earliest public day per (pool trial, option count): the mask that top_k applies
  first_day_NO = np.full((len(pool_ids), len(OPTION_COUNTS)), _NEVER, np.int64)
  for tid, qs in pool_by_trial.items():
    for q in qs:
      o = OPTION_COUNTS.index(q.n_options)
      first_day_NO[row_of[tid], o] = min(first_day_NO[row_of[tid], o], _days(q.public_date))

  coverage: dict = collections.defaultdict(collections.Counter)
  groups: dict[tuple[str, str, int], list[Example]] = collections.defaultdict(list)
  for q in questions:
    cov = coverage[split_of(q.trial_id)]
    cov["targets"] += 1
    if not q.public_date:
      cov["no_public_date"] += 1
    elif q.trial_id not in trials:
      cov["no_trial_text"] += 1
    else:
      groups[(q.trial_id, q.public_date, q.n_options)].append(q)

  found: dict[str, list[Retrieved]] = {}
  fitted = None
  if pool_ids and groups:
    fitted = retrieval.make_retriever(
        retriever, pool_ids, [retrieval.trial_text(trials[t]) for t in pool_ids], embed)
    keys = sorted(groups)
    for start in range(0, len(keys), QUERY_CHUNK):
      chunk = keys[start:start + QUERY_CHUNK]
      query_ids = sorted({tid for tid, _, _ in chunk})  # one query per trial, not per group
      query_of = {tid: i for i, tid in enumerate(query_ids)}
      scores_QN = fitted.scores([retrieval.trial_text(trials[tid]) for tid in query_ids])
      scores_GN = scores_QN[[query_of[tid] for tid, _, _ in chunk]]
      day_G = np.array([_days(d) for _, d, _ in chunk])
      opt_G = np.array([OPTION_COUNTS.index(n) for _, _, n in chunk])
      own_G = np.array([row_of.get(tid, -1) for tid, _, _ in chunk])
      allowed_GN = ((first_day_NO.T[opt_G] < day_G[:, None])
                    & (np.arange(len(pool_ids))[None, :] != own_G[:, None]))
      best_GK, rows_GK, valid_GK = retrieval.top_k(scores_GN, allowed_GN, k)
      for g, key in enumerate(chunk):
        hits = [(pool_ids[r], float(s)) for s, r, v in
                zip(best_GK[g], rows_GK[g], valid_GK[g]) if v]
        chosen: dict[tuple, list[Retrieved]] = {}  # the targets' fields _closest reads
        for target in groups[key]:
          like = (target.question_type, target.outcome_title or target.endpoint)
          if like not in chosen:
            chosen[like] = [Retrieved(_closest(target, pool_by_trial[tid]), round(s, 4))
                            for tid, s in hits]
          found[target.id] = chosen[like]
  for q in questions:
    n = len(found.get(q.id, ()))
    cov = coverage[split_of(q.trial_id)]
    cov["with_k"] += n >= k
    cov["with_any"] += n > 0
  pool_dates = [min(q.public_date for q in pool_by_trial[t]) for t in pool_ids]
  return AnchorSet(found, fitted, pool_dates,
                   {s: dict(sorted(c.items())) for s, c in sorted(coverage.items())})


def _closest(target: Example, candidates: Sequence[Example]) -> Example:
  """The candidate question nearest the target (same options count, public before it)."""
  ok = [q for q in candidates if q.n_options == target.n_options
        and time_respecting(q.public_date, target.public_date)]
  return min(ok, key=lambda q: (q.question_type != target.question_type,
                                -text_overlap(q.outcome_title or q.endpoint,
                                              target.outcome_title or target.endpoint),
                                q.id))


def breaks_time_rule(ex: Example) -> bool:
  """A cross-trial pair whose anchor was not public before the target's cutoff."""
  return (ex.anchor is not None and ex.anchor_trial_id != ex.trial_id
          and not time_respecting(ex.anchor.public_date, ex.public_date))


def assert_time_respecting(examples: Iterable[Example]) -> None:
  """Raises AssertionError naming the cross-trial pairs whose anchor was not public
  before the target's cutoff (the build calls it on everything it writes)."""
  time_rule_error([ex.id for ex in examples if breaks_time_rule(ex)])


def time_rule_error(bad_ids: Sequence[str]) -> None:
  """Raises AssertionError naming the first of `bad_ids` (breaks_time_rule), if any."""
  if bad_ids:
    raise AssertionError(f"{len(bad_ids)} cross-trial pairs break the time rule: {bad_ids[:5]}")
