"""Successive imagining with a tiny random model on real CT Open questions.

Chains are made with pairs.make_pair (the real chain renderer) from Summer targets
and Winter anchors with hand-written factor steps; the batched walk is checked
against a one-chain-at-a-time walk, aggregation against NumPy.
"""
import dataclasses

import numpy as np
import pytest
from flax import nnx

from data_pipeline import pairs, templates
from data_pipeline.build_report import BuildReport
from data_pipeline.example import Factor
from data_pipeline.readers import ct_open
from deepimagine_jax import model as M
from deepimagine_jax.config import ModelConfig
from deepimagine_jax.eval import imagining, scoring
from deepimagine_jax.tokenizer import Tokenizer

PROMPT_LEN = 128
BATCH = 8
STEPS = [Factor("dose", "10 mg", "20 mg"), Factor("population", "adult", "older adult"),
         Factor("outcome", "HbA1c", "body weight")]


@pytest.fixture(scope="module")
def data(data_root):
  summer = ct_open.read_questions(data_root / "ct_open" / "Summer_2025.pickle", BuildReport(),
                                  split="eval")
  winter = ct_open.read_questions(data_root / "ct_open" / "Winter_2025.pickle", BuildReport(),
                                  split="train")
  t2 = [q for q in summer if q.n_options == 2][:2]
  t3 = [q for q in summer if q.n_options == 3][:1]
  targets = [templates.render(q) for q in (t2[:1] + t3 + t2[1:])]  # 2-, 3-, 2-way
  a2 = [q for q in winter if q.n_options == 2][:2]
  a3 = [q for q in winter if q.n_options == 3][:2]

  def chain(anchor, target, steps):
    return pairs.make_pair(anchor, target, "chain", steps)

  chains = [chain(a2[0], targets[0], STEPS[:1]), chain(a2[1], targets[0], STEPS[:2]),
            chain(a3[0], targets[1], STEPS), chain(a3[1], targets[1], STEPS[2:])]
  texts = [t.prompt for t in targets] + [c.prompt for c in chains]
  texts += [templates.render(q).prompt for q in summer[::20]]
  return targets, chains, texts


@pytest.fixture(scope="module")
def policy(data, tmp_path_factory):
  tok = Tokenizer.train(data[2], tmp_path_factory.mktemp("tok"), vocab_size=400)
  cfg = ModelConfig.tiny().replace(vocab_size=tok.vocab_size, tie_embeddings=False)
  graphdef, params = nnx.split(M.Transformer(cfg, nnx.Rngs(1)))
  return tok, graphdef, params


def _score(policy, examples):
  tok, graphdef, params = policy
  return scoring.option_probs_by_scoring(graphdef, params, tok, examples,
                                            prompt_len=PROMPT_LEN, batch_size=BATCH)


def _walk_one(policy, ch):
  """The reference: one chain, one step at a time, nothing batched with other chains."""
  current = ch.anchor.answer
  n = ch.n_options
  for d in range(len(ch.factors)):
    prompt, _ = templates.render_chain_step(ch, d, current)
    p = _score(policy, [ch.replace(id="x", prompt=prompt)])[0, :n]
    current = ch.options[int(np.argmax(p))]
  return p


@pytest.mark.parametrize("how", ["mean", "geometric"])
def test_imagine_matches_sequential_walk(policy, data, how):
  tok, graphdef, params = policy
  targets, chains, _ = data
  probs, traj, stats = imagining.imagine(graphdef, params, tok, targets, chains, k=2, how=how,
                                         prompt_len=PROMPT_LEN, batch_size=BATCH)
  assert probs.shape == (3, 3)
  for t, p in zip(targets, probs):
    n = t.n_options
    assert np.all(p >= 0) and p.sum() == pytest.approx(1.0) and np.all(p[n:] == 0)
  finals = [_walk_one(policy, ch) for ch in chains]
  ref0 = imagining.aggregate(np.stack(finals[:2]), how)
  ref1 = imagining.aggregate(np.stack(finals[2:]), how)
  np.testing.assert_allclose(probs[0, :2], ref0, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(probs[1], ref1, rtol=1e-5, atol=1e-7)
  # target 2 has no chain: the direct answer, counted
  np.testing.assert_allclose(probs[2], _score(policy, targets[2:])[0], rtol=1e-6)
  assert stats["fallback"] == 1 and stats["imagined"] == 2 and stats["chains"] == 4
  assert stats["scoring_calls"] == 3 and stats["steps"] == 1 + 2 + 3 + 1
  assert len(traj) == stats["steps"] and sum(t.details["final"] for t in traj) == 4
  # step 0 starts from the anchor's observed answer, later steps from the last choice
  first = [t for t in traj if t.details["chain_id"] == chains[1].id]
  assert first[0].details["current_result"] == chains[1].anchor.options[chains[1].anchor.label]
  assert first[1].details["current_result"] == chains[1].options[int(np.argmax(first[0].probs))]


def test_fallback_uses_given_direct_probs(policy, data):
  tok, graphdef, params = policy
  targets, _, _ = data
  direct = np.array([[0.3, 0.7, 0], [0.2, 0.3, 0.5], [0.9, 0.1, 0]])
  probs, traj, stats = imagining.imagine(graphdef, params, tok, targets, [], k=2, how="mean",
                                         prompt_len=PROMPT_LEN, batch_size=BATCH,
                                         direct_probs=direct)
  np.testing.assert_array_equal(probs, direct)
  assert stats["fallback"] == 3 and traj == [] and stats["scoring_calls"] == 0


def test_select_chains_leaks_and_k(data):
  targets, chains, _ = data
  chosen, skipped = imagining.select_chains(targets, chains, k=1)
  assert [len(chosen[i]) for i in sorted(chosen)] == [1, 1] and skipped["over_k"] == 2
  banned = {chains[0].anchor.id}
  chosen, skipped = imagining.select_chains(targets, chains, k=2, exclude_anchor_ids=banned)
  assert skipped["anchor_is_target"] == 1 and chosen[0] == [chains[1]]
  own = chains[2].replace(anchor=dataclasses.replace(chains[2].anchor, id=targets[0].id))
  _, skipped = imagining.select_chains(targets, [own], k=2)
  assert skipped["anchor_is_target"] == 1
  trial = chains[3].anchor.trial_id
  _, skipped = imagining.select_chains(targets, chains, k=2, exclude_anchor_trials={trial})
  assert skipped["anchor_is_target"] == sum(c.anchor.trial_id == trial for c in chains) > 0
  assert imagining.chain_target_id(chains[2]) == targets[1].id


def test_aggregate_vs_numpy():
  p = np.array([[0.2, 0.8, 0.0], [0.6, 0.1, 0.3]])
  np.testing.assert_allclose(imagining.aggregate(p, "mean"), [0.4, 0.45, 0.15])
  g = np.array([np.sqrt(0.2 * 0.6), np.sqrt(0.8 * 0.1), np.sqrt(1e-12 * 0.3)])
  np.testing.assert_allclose(imagining.aggregate(p, "geometric"), g / g.sum())
  one = np.array([[0.25, 0.75]])
  np.testing.assert_allclose(imagining.aggregate(one, "geometric"), [0.25, 0.75])
  with pytest.raises(ValueError, match="aggregate"):
    imagining.aggregate(p, "median")
  with pytest.raises(ValueError):
    imagining.aggregate(np.zeros((0, 2)), "mean")
