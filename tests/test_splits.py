"""splits: deterministic trial hashing, time-ordered CT Open, no leakage."""
import collections
import hashlib
import os
import subprocess
import sys

import pytest

from data_pipeline import splits
from data_pipeline.build_report import BuildReport
from data_pipeline.example import Example
from data_pipeline.readers import ct_open


def _ex(eid, trial, anchor=""):
  return Example(id=eid, source="test", kind="question", trial_id=trial, options=("a", "b"),
                 label=0, anchor_trial_id=anchor)


def test_unit_hash_matches_sha256_reference():
  ref = int.from_bytes(hashlib.sha256(b"7:NCT01").digest()[:8], "big") / 2.0**64
  assert splits.unit_hash("NCT01", 7) == ref
  assert 0.0 <= ref < 1.0


def test_split_does_not_depend_on_python_hash_seed():
  code = ("from data_pipeline import splits;"
          "print([splits.trial_split(f'NCT{i}', 3) for i in range(50)])")
  outs = []
  for hs in ("1", "2"):
    env = dict(os.environ, PYTHONHASHSEED=hs, PYTHONPATH=os.getcwd())
    outs.append(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                               capture_output=True, text=True).stdout)
  assert outs[0] == outs[1]
  assert outs[0].strip() == str([splits.trial_split(f"NCT{i}", 3) for i in range(50)])


def test_fractions_are_respected():
  c = collections.Counter(splits.trial_split(f"T{i}", 0, 0.1, 0.2, 0.05) for i in range(20000))
  for name, frac in (("dev", 0.1), ("rl", 0.2), ("eval", 0.05), ("train", 0.65)):
    assert abs(c[name] / 20000 - frac) < 0.015, (name, c)
  with pytest.raises(ValueError):
    splits.trial_split("T", 0, 0.5, 0.5)


def test_assign_is_deterministic_and_by_trial():
  exs = [_ex(f"e{i}", f"T{i % 40}") for i in range(200)]
  a = splits.assign_splits(exs, seed=5)
  b = splits.assign_splits(exs, seed=5)
  assert a == b
  per_trial = collections.defaultdict(set)
  for s, xs in a.items():
    for x in xs:
      per_trial[x.trial_id].add(s)
      assert x.split == s
  assert all(len(v) == 1 for v in per_trial.values())
  splits.assert_no_leakage(a)


def test_eval_trial_as_anchor_is_excluded_from_training():
  report = BuildReport()
  # pick a trial id that hashes to train so the only thing that can move it is the rule
  train_ids = [f"T{i}" for i in range(100) if splits.trial_split(f"T{i}", 0) == "train"]
  t_train, t_train2 = train_ids[:2]
  exs = [
      _ex("eval_q", "EVAL1"),
      _ex("leaky", t_train, anchor="EVAL1"),        # eval result shown to a train example
      _ex("ok_pair", t_train, anchor=t_train2),     # train anchor: fine
      _ex("natural", "EVAL1", anchor="EVAL1"),      # in-trial pair stays in eval
      _ex("eval_from_train", "EVAL1", anchor=t_train),
  ]
  out = splits.assign_splits(exs, seed=0, eval_trial_ids={"EVAL1"}, report=report)
  ids = {s: sorted(x.id for x in xs) for s, xs in out.items()}
  assert ids["eval"] == ["eval_from_train", "eval_q", "natural"]
  assert "leaky" not in sum(ids.values(), [])
  assert "ok_pair" in ids["train"]
  assert report.n_skipped("splits", "anchor_in_eval") == 1
  splits.assert_no_leakage(out)


def test_assert_no_leakage_names_the_ids():
  with pytest.raises(splits.LeakageError, match="EVAL9"):
    splits.assert_no_leakage({"eval": [_ex("a", "EVAL9")],
                              "train": [_ex("b", "T1", anchor="EVAL9")]})
  with pytest.raises(splits.LeakageError, match="T1"):
    splits.assert_no_leakage({"eval": [_ex("a", "T1")], "train": [_ex("b", "T1")]})
  with pytest.raises(splits.LeakageError, match="DEV1"):
    splits.assert_no_leakage({"dev": [_ex("a", "DEV1")], "rl": [_ex("b", "T2", anchor="DEV1")]})
  with pytest.raises(splits.LeakageError, match="E2"):
    splits.assert_no_leakage({"eval": [_ex("a", "E1", anchor="E2"), _ex("b", "E2")]})


def test_ct_open_time_order(data_root):
  r = BuildReport()
  win = ct_open.read_questions(data_root / "ct_open" / "Winter_2025.pickle", r)
  summ = ct_open.read_questions(data_root / "ct_open" / "Summer_2025.pickle", r)
  eval_ids = splits.ct_open_eval_ids(win + summ)
  assert eval_ids == {q.trial_id for q in summ}
  out = splits.assign_splits(win + summ, seed=0, eval_trial_ids=eval_ids)
  summer_ids = {q.id for q in summ}
  assert {x.id for x in out["eval"]} == summer_ids
  assert set(out) <= {"train", "dev", "rl", "eval"} and len(out["train"]) > len(out.get("dev", ()))
  splits.assert_no_leakage(out)


def test_natural_pairs_of_held_out_targets_are_dropped_and_counted():
  seed = 0
  dev = next(f"T{i}" for i in range(1000) if splits.trial_split(f"T{i}", seed) == "dev")
  train = next(f"T{i}" for i in range(1000) if splits.trial_split(f"T{i}", seed) == "train")
  nat = lambda eid, t: _ex(eid, t, anchor=t).replace(kind="natural_pair")
  synthetic = _ex("syn", "EVAL1", anchor="EVAL1").replace(kind="synthetic")
  report = BuildReport()
  out = splits.assign_splits([nat("n_eval", "EVAL1"), nat("n_dev", dev), nat("n_train", train),
                              synthetic], seed, eval_trial_ids={"EVAL1"}, report=report)
  assert [ex.id for ex in out["train"]] == ["n_train"]
  assert [ex.id for ex in out["eval"]] == ["syn"]  # synthetic tasks are not trial results
  assert "dev" not in out
  assert report.n_skipped("splits", "natural_pair_in_eval") == 1
  assert report.n_skipped("splits", "natural_pair_in_dev") == 1
  of = splits.TrialSplits(seed, eval_trial_ids={"EVAL1"})
  assert (of("EVAL1"), of(dev), of(train)) == ("eval", "dev", "train")
  with pytest.raises(splits.LeakageError, match="n_eval has an anchor from its own trial"):
    splits.assert_no_leakage({"eval": [nat("n_eval", "EVAL1")]})


def test_per_arm_operators_train_only():
  """arm_estimate / arm_compare show the target's own per-arm result in the prompt or the
  completion: kept in train and rl, dropped and counted in dev and eval."""
  seed = 0
  by_split = {s: next(f"T{i}" for i in range(1000) if splits.trial_split(f"T{i}", seed) == s)
              for s in ("train", "dev", "rl")}
  by_split["eval"] = "EVAL1"
  exs = [_ex(f"{kind}-{s}", t).replace(kind=kind) for s, t in by_split.items()
         for kind in ("arm_estimate", "arm_compare")]
  report = BuildReport()
  out = splits.assign_splits(exs, seed, eval_trial_ids={"EVAL1"}, report=report)
  assert sorted(out) == ["rl", "train"]
  assert {ex.id for ex in out["train"]} == {"arm_estimate-train", "arm_compare-train"}
  for kind in ("arm_estimate", "arm_compare"):
    for s in ("dev", "eval"):
      assert report.n_skipped("splits", f"{kind}_in_{s}") == 1
