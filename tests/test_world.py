"""The trial world: deterministic, significance from an actual test, held-out sets that hold."""
import dataclasses

import numpy as np
import pytest
from scipy import stats

from configs import world as world_config
from data_pipeline import questions, world_build
from data_pipeline.build_report import BuildReport
from data_pipeline.world import WorldConfig, curve, generate_world, welch


@pytest.fixture(scope="module")
def cfg() -> WorldConfig:
  return WorldConfig(**dict(world_config.get_config("quick").world))


@pytest.fixture(scope="module")
def world(cfg):
  return generate_world(cfg)


def test_same_seed_same_world(cfg, world):
  again = generate_world(cfg)
  assert again.trials == world.trials
  np.testing.assert_array_equal(again.mechanism.potency_DC, world.mechanism.potency_DC)
  other = generate_world(dataclasses.replace(cfg, seed=cfg.seed + 1))
  assert other.trials != world.trials


def test_welch_matches_scipy():
  rng = np.random.default_rng(0)
  a, b = rng.normal(0.3, 1.0, 40), rng.normal(0.0, 2.0, 25)
  diff, p, lo, hi = welch(a, b)
  ref = stats.ttest_ind(a, b, equal_var=False)
  assert p == pytest.approx(ref.pvalue, rel=1e-10)
  ci = ref.confidence_interval(0.95)
  assert (lo, hi) == pytest.approx((ci.low, ci.high), rel=1e-10)
  assert diff == pytest.approx(a.mean() - b.mean())


def test_curves():
  x = np.linspace(0, 1, 11)
  for kind in ("linear", "emax"):
    y = [curve(kind, v, 0.2) for v in x]
    assert np.all(np.diff(y) > 0) and y[-1] == pytest.approx(1.0)
  u = [curve("inverted_u", v, 0.2) for v in x]
  assert np.argmax(u) == 5 and u[0] == u[-1] == 0.0


def test_significance_labels_agree_with_a_recomputed_test(world):
  """Every question's label from scipy's Welch test on the drawn values and the polarity."""
  checked = 0
  labels = set()
  for t in world.trials:
    for q in questions.derive_questions(t):
      o = t.outcomes[q.outcome_index]
      va, vb = ({v.arm_id: v for v in o.values}[g] for g in (q.group_a_id, q.group_b_id))
      a, b = (world.draws[(t.id, q.outcome_index, v.arm_label)] for v in (va, vb))
      assert (va.value, va.n) == (pytest.approx(a.mean()), a.size)
      p = stats.ttest_ind(a, b, equal_var=False).pvalue
      an = next(x for x in o.analyses if set(x.arm_ids) == {q.group_a_id, q.group_b_id})
      assert an.p_value == pytest.approx(p, rel=1e-9)
      better = (a.mean() > b.mean()) == (o.polarity == "higher_better")
      sig = p < 0.05
      want = {"superiority": 0 if sig and better else 1,
              "endpoint_met": 0 if sig and better else 1,
              "comparative": 2 if not sig else (0 if better else 1)}[q.question_type]
      assert q.label == want, q.id
      labels.add((q.question_type, q.label))
      checked += 1
  assert checked > 100
  assert {("comparative", 0), ("comparative", 2), ("superiority", 0),
          ("superiority", 1)} <= labels  # both outcomes happen


def test_heldout_never_in_training(cfg, world):
  by_split, coverage = world_build.build_examples(world, cfg, anchors_k=3, retriever="tfidf",
                                                  max_anchors=3, report=BuildReport())
  m = world.mechanism
  assert m.heldout_combos and all(by_split[s] for s in world_build.HELDOUT_SPLITS)
  for split in world_build.TRAINING:
    for ex in by_split[split]:
      for tid in {ex.trial_id, ex.anchor_trial_id} - {""}:
        _, c = world.combo_of[tid]
        for p in world.arm_plans[tid].values():
          if p.drug >= 0:
            assert (p.drug, c) not in m.heldout_combos, ex.id
            assert p.dose_mg not in m.heldout_doses[p.drug], ex.id
  # every held-out trial really holds what its split says
  held = world_build.heldout_split_of(world)
  for ex in by_split["test_dose"]:
    plans = world.arm_plans[ex.trial_id].values()
    assert any(p.drug >= 0 and p.dose_mg in m.heldout_doses[p.drug] for p in plans)
  assert {held[ex.trial_id] for ex in by_split["test_combo"]} == {"test_combo"}
  # and the assertion itself fires on a leak
  leak = dict(by_split, train=by_split["train"] + by_split["test_combo"][:1])
  with pytest.raises(world_build.HeldOutLeakError, match="held-out"):
    world_build.assert_heldout(world, leak)


def test_bad_world_config_names_the_key(cfg):
  with pytest.raises(ValueError, match="world.dose_levels"):
    dataclasses.replace(cfg, dose_levels=(0.5, 0.25, 1.0))
  with pytest.raises(ValueError, match="world.regions"):
    dataclasses.replace(cfg, regions=("Atlantis", "Europe"))
