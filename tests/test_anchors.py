"""anchors: the time rule, the training-only pool, one anchor per trial, coverage."""
import numpy as np
import pytest

from configs import world as world_config
from data_pipeline import anchors, facts, retrieval, splits, world_build
from data_pipeline.build_report import BuildReport
from data_pipeline.example import Anchor, Example, Facts
from data_pipeline.schema import Trial
from data_pipeline.world import WorldConfig, generate_world

TITLE = "Drug X for chronic pain in adults"
SPLIT = {"SUM1": "eval", "SUM2": "eval", "WIN1": "train", "WIN2": "rl", "REG1": "train",
         "REG3": "train", "LATE": "train", "DEV1": "dev", "FAR": "train"}


def _trial(tid, title=TITLE, posted=""):
  return Trial(tid, "ctgov_xml", title, "", (), (), None, "", "", (), (), None,
               results_posted=posted)


def _q(qid, tid, source="ctgov_xml", release="", n=2, outcome="pain score", qtype=""):
  opts = ("up", "down", "same")[:n]
  return Example(id=qid, source=source, kind="question", trial_id=tid, options=opts, label=0,
                 split=release, outcome_title=outcome, question_type=qtype,
                 facts=Facts(outcome=outcome))


def _world():
  trials = {t.id: t for t in (
      _trial("SUM1"), _trial("SUM2"), _trial("WIN1"), _trial("WIN2"),
      _trial("REG1", posted="2015-03-19"), _trial("REG3", posted="2016-01-01"),
      _trial("LATE", posted="2025-05-01"), _trial("DEV1", posted="2014-01-01"),
      _trial("FAR", title="Insulin in type 2 diabetes", posted="2010-01-01"))}
  qs = [_q("s1", "SUM1", "ct_open", "Summer_2025"), _q("s2", "SUM2", "ct_open", "Summer_2025"),
        _q("w1", "WIN1", "ct_open", "Winter_2025"), _q("w2", "WIN2", "ct_open", "Winter_2025"),
        _q("r1a", "REG1", outcome="HbA1c"),
        _q("r1b", "REG1", outcome="pain score at week 4", qtype="superiority"),
        _q("r1c", "REG1", outcome="pain score"),
        _q("r3", "REG3", n=3), _q("late", "LATE"), _q("d1", "DEV1"), _q("far", "FAR"),
        _q("ei", "PMC1", source="evidence_inference")]
  return anchors.with_public_dates(qs, trials), trials


def test_public_dates_follow_release_and_registry():
  qs, _ = _world()
  date = {q.id: q.public_date for q in qs}
  assert date["s1"] == "2025-09-01" and date["w1"] == "2025-02-01"
  assert date["r1a"] == "2015-03-19" and date["late"] == "2025-05-01" and date["ei"] == ""
  assert anchors.time_respecting("2025-02-01", "2025-09-01")
  assert not anchors.time_respecting("2025-02-01", "2025-02-01")  # same cutoff: hidden
  assert not anchors.time_respecting("", "2025-09-01")
  assert not anchors.time_respecting("2015-01-01", "")


def _anchor_ids(found, qid):
  return [r.question.id for r in found.anchors.get(qid, ())]


def test_anchors_respect_time_pool_and_option_count():
  qs, trials = _world()
  found = anchors.find_anchors(qs, trials, lambda t: SPLIT.get(t, "train"), k=10,
                               retriever="tfidf")
  by_id = {q.id: q for q in qs}
  summer = _anchor_ids(found, "s1")
  # never an eval trial (SUM2), a dev trial (DEV1), a 3-option question (REG3); FAR
  # shares no word; one anchor per trial
  assert sorted(summer) == ["late", "r1c", "w1", "w2"]
  # the closest question of REG1: same question type first (not r1b), then outcome words
  # (r1c, not r1a)
  assert "r1c" in summer
  # Winter targets: no Winter anchor (same cutoff), no anchor posted after 2025-02-01
  assert _anchor_ids(found, "w1") == ["r1c"]
  # registry targets: only anchors posted earlier; REG1 (2015) has none before it
  assert _anchor_ids(found, "r1a") == []
  assert sorted(_anchor_ids(found, "late")) == ["r1c", "w1", "w2"]  # Winter is before May
  for tid, rs in found.anchors.items():
    for r in rs:
      assert anchors.time_respecting(r.question.public_date, by_id[tid].public_date)
      assert r.question.trial_id != by_id[tid].trial_id
      assert SPLIT[r.question.trial_id] in ("train", "rl")
  sims = [r.similarity for r in found.anchors["s1"]]
  assert sims == sorted(sims, reverse=True) and all(s > 0 for s in sims)
  assert found.retriever.ids == ("FAR", "LATE", "REG1", "REG3", "WIN1", "WIN2")  # pool only


def test_k_caps_and_coverage_counts():
  qs, trials = _world()
  found = anchors.find_anchors(qs, trials, lambda t: SPLIT.get(t, "train"), k=2,
                               retriever="bm25")
  assert len(found.anchors["s1"]) == 2
  cov = found.coverage
  assert cov["eval"] == {"targets": 2, "with_any": 2, "with_k": 2}
  # train: w1 (1 anchor), r1a/r1b/r1c, r3, far (none), late (3), ei (no date)
  assert cov["train"]["targets"] == 8 and cov["train"]["no_public_date"] == 1
  assert cov["train"]["with_k"] == 1 and cov["train"]["with_any"] == 2


def test_assert_time_respecting_names_the_pair():
  target = _q("t", "SUM1", "ct_open", "Summer_2025").replace(public_date="2025-09-01")
  early = _q("a", "REG1").replace(public_date="2015-01-01")
  late = early.replace(id="b", public_date="2025-09-01")
  ok = Example.pair(early, target, "approximate_pair", [])
  anchors.assert_time_respecting([ok])
  assert ok.anchor == Anchor.of(early) and ok.anchor.public_date == "2015-01-01"
  bad = Example.pair(late, target, "approximate_pair", [])
  with pytest.raises(AssertionError, match="approximate_pair:b->t"):
    anchors.assert_time_respecting([ok, bad])


def _reference_anchors(qs, trials, split_of, k):
  """find_anchors one target at a time, as plainly as it can be said: score the target's
  trial against every pool trial (sklearn's TF-IDF, one query), keep the pool trials
  with a question of the same option count public before the target, not its own
  trial, scoring > 0; best k by (-score, trial id); from each, the closest question."""
  pool = {}
  for q in qs:
    if q.public_date and q.trial_id in trials and split_of(q.trial_id) in splits.TRAINING:
      pool.setdefault(q.trial_id, []).append(q)
  ids = sorted(pool)
  vec = retrieval.TfidfRetriever(ids, [retrieval.trial_text(trials[t]) for t in ids])
  out = {}
  for q in qs:
    if not q.public_date or q.trial_id not in trials:
      continue
    s = (vec.vectorizer.transform([retrieval.trial_text(trials[q.trial_id])])
         @ vec.matrix_NV.T).toarray()[0].astype(np.float32)
    ok = [i for i, t in enumerate(ids) if t != q.trial_id and s[i] > 0 and any(
        a.n_options == q.n_options and anchors.time_respecting(a.public_date, q.public_date)
        for a in pool[t])]
    best = sorted(ok, key=lambda i: (-s[i], i))[:k]
    out[q.id] = []
    for i in best:
      cands = [a for a in pool[ids[i]] if a.n_options == q.n_options
               and anchors.time_respecting(a.public_date, q.public_date)]
      best_q = min(cands, key=lambda a, q=q: (a.question_type != q.question_type,
                                             -facts.text_overlap(a.outcome_title or a.endpoint,
                                                                 q.outcome_title or q.endpoint),
                                             a.id))
      out[q.id].append((best_q.id, round(float(s[i]), 4)))
  return out


def test_anchors_of_a_small_world_match_a_one_target_at_a_time_reference(monkeypatch):
  """Pins the batched find_anchors (queries per trial, chunks, common terms scored
  densely, the closest question shared by like targets) to the plain per-target rule."""
  cfg = WorldConfig(**dict(world_config.get_config("quick").world))
  world = generate_world(cfg)
  trials = {t.id: t for t in world.trials}
  qs = anchors.with_public_dates(facts.attach_facts(
      world_build.world_questions(world, BuildReport()), trials), trials)
  split_of = splits.TrialSplits(cfg.seed, dev_fraction=cfg.dev_fraction,
                                rl_fraction=cfg.rl_fraction,
                                eval_trial_ids=world_build.heldout_split_of(world))
  monkeypatch.setattr(anchors, "QUERY_CHUNK", 5)  # several chunks, a short last one
  monkeypatch.setattr(retrieval, "QUERY_BATCH", 8)
  found = anchors.find_anchors(qs, trials, split_of, k=3, retriever="tfidf")
  assert len(found.retriever.split.common) > 0  # the dense block is exercised
  got = {qid: [(r.question.id, r.similarity) for r in rs] for qid, rs in found.anchors.items()}
  ref = _reference_anchors(qs, trials, split_of, k=3)
  assert got == ref
  assert sum(len(v) == 3 for v in ref.values()) > len(ref) // 2  # most targets have k
