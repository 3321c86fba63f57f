"""Stepwise imagining with a tiny random model on real CT Open questions.

Cross-trial records are made with pairs.make_pair (the build's renderer) from Summer
targets and Winter anchors with hand-written steps: chains, one-step approximate
pairs and one with no known factor. The batched walk is checked against a plain
one-walk-at-a-time loop and a NumPy aggregate; prompts against the token limit.
"""
import dataclasses
import re

import numpy as np
import pytest
from flax import nnx

from data_pipeline import pairs, templates
from data_pipeline.build_report import BuildReport
from data_pipeline.example import Factor
from data_pipeline.readers import ct_open
from deepimagine_jax import model as M
from deepimagine_jax.config import ModelConfig
from deepimagine_jax.eval import imagining, report, scoring
from deepimagine_jax.tokenizer import Tokenizer

PROMPT_LEN = 224
DECISION = dict(walk="decision", max_new_tokens=0)  # walks whose state is an option sentence
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
  a2 = [q for q in winter if q.n_options == 2][:4]
  a3 = [q for q in winter if q.n_options == 3][:2]

  def rec(anchor, target, kind, steps, similarity):
    return pairs.make_pair(anchor, target, kind, steps, similarity=similarity)

  records = [  # target 0: three walks (0, 1 and 2 steps) + one farther than k = 3
      rec(a2[0], targets[0], "approximate_pair", STEPS[:1], 0.5),
      rec(a2[1], targets[0], "chain", STEPS[:2], 0.9),
      rec(a2[2], targets[0], "approximate_pair", [], 0.7),
      rec(a2[3], targets[0], "chain", STEPS[1:], 0.1),
      # target 1: a three-step chain and a one-step pair; target 2: none
      rec(a3[0], targets[1], "chain", STEPS, 0.3), rec(a3[1], targets[1], "chain", STEPS[2:], 0.2),
      # a same-trial pair is never walked
      rec(a2[0], targets[0], "natural_pair", STEPS[:1], None)]
  texts = [t.prompt for t in targets] + [r.prompt for r in records]
  texts += [templates.render(q).prompt for q in summer[::10]]
  texts += [templates.decision_line(n, i) for n in (2, 3) for i in range(n)]
  return targets, records, texts


@pytest.fixture(scope="module")
def policy(data, tmp_path_factory):
  tok = Tokenizer.train(data[2], tmp_path_factory.mktemp("tok"), vocab_size=1000)
  cfg = ModelConfig.tiny().replace(vocab_size=tok.vocab_size, tie_embeddings=False)
  graphdef, params = nnx.split(M.Transformer(cfg, nnx.Rngs(1)))
  return tok, graphdef, params


def _n_tokens(tok, text):
  head, body = tok.prompt_ids(text)
  return len(head) + len(body)


def _walk_one(policy, rec, prompt_len=PROMPT_LEN):
  """The reference: one walk, one call at a time, nothing batched with other walks."""
  tok, graphdef, params = policy
  n_tokens = lambda text: _n_tokens(tok, text)
  current, prompts = rec.anchor.options[rec.anchor.label], []
  for d in range(max(len(rec.factors), 1)):
    if rec.factors:
      prompt, _ = templates.render_chain_step(rec, d, current, n_tokens=n_tokens,
                                              max_tokens=prompt_len)
    else:
      prompt = templates.fit_to_tokens(templates.render(rec), n_tokens, prompt_len).prompt
    assert n_tokens(prompt) <= prompt_len
    p = scoring.option_probs_by_scoring(graphdef, params, tok, [rec.replace(prompt=prompt)],
                                        prompt_len=prompt_len, batch_size=1)[0, :rec.n_options]
    prompts.append(prompt)
    current = rec.options[int(np.argmax(p))]
  return p, prompts


def _np_aggregate(rows, how):
  p = np.asarray(rows, np.float64)
  out = p.mean(0) if how == "mean" else np.exp(np.log(np.maximum(p, 1e-12)).mean(0))
  return out / out.sum()


@pytest.mark.parametrize("how", ["mean", "geometric"])
def test_imagine_matches_one_walk_at_a_time(policy, data, how):
  tok, graphdef, params = policy
  targets, records, _ = data
  probs, traj, stats = imagining.imagine(graphdef, params, tok, targets, records, k=3, how=how,
                                         prompt_len=PROMPT_LEN, batch_size=BATCH, **DECISION)
  assert probs.shape == (3, 3)
  walked = {0: [records[1], records[2], records[0]], 1: [records[4], records[5]]}  # nearest first
  for i, recs in walked.items():
    refs = [_walk_one(policy, r) for r in recs]
    n = targets[i].n_options
    np.testing.assert_allclose(probs[i, :n], _np_aggregate([p for p, _ in refs], how),
                               rtol=1e-5, atol=1e-7)
    assert np.all(probs[i, n:] == 0)
    walks = traj[i].details["walks"]
    assert [w["pair_id"] for w in walks] == [r.id for r in recs]
    for w, r, (p_ref, prompts) in zip(walks, recs, refs):
      assert [s["prompt"] for s in w["steps"]] == prompts
      np.testing.assert_allclose(w["probs"], p_ref, rtol=1e-5, atol=1e-7)
      # each step is given the anchor's observed result, then the previous step's estimate
      given = [s["given"] for s in w["steps"]]
      assert given == [r.anchor.options[r.anchor.label]] + [s["estimate"] for s in w["steps"][:-1]]
      assert [s["factor"] for s in w["steps"]] == ([f.factor for f in r.factors] or [""])
  assert np.isnan(probs[2]).all() and traj[2].probs is None  # no anchor: no answer, counted
  assert traj[2].details == {"answered_by": "none", "aggregate": how, "walks": []}
  assert [t.details["answered_by"] for t in traj] == ["anchors", "anchors", "none"]
  assert stats["imagined"] == 2 and stats["missing"] == 1 and stats["fallback"] == 0
  assert stats["coverage"] == pytest.approx(2 / 3) and stats["no_anchors"] == 1
  assert stats["anchors_per_target"] == {"0": 1, "2": 1, "3": 1}
  assert stats["walks"] == 5 and stats["walks_by_steps"] == {"0": 1, "1": 2, "2": 1, "3": 1}
  assert stats["scoring_calls"] == 3 and stats["prompts_scored"] == 1 + 1 + 2 + 3 + 1
  assert stats["skipped"] == {"anchor_is_eval": 0, "options_differ": 0, "over_k": 1}


def test_prompts_fit_the_window_or_the_walk_is_counted(policy, data):
  """Step prompts are re-rendered to the token window, never cut; one that cannot fit
  ends its walk, counted, and a target without a finished walk is not answered."""
  tok, graphdef, params = policy
  targets, records, _ = data
  unfitted = templates.render_chain_step(records[4], 0, "x")[0]
  assert _n_tokens(tok, unfitted) > PROMPT_LEN  # so the limit is exercised
  _, traj, _ = imagining.imagine(graphdef, params, tok, targets[1:2], records, k=1,
                                 how="mean", prompt_len=PROMPT_LEN, batch_size=BATCH, **DECISION)
  for s in traj[0].details["walks"][0]["steps"]:
    assert _n_tokens(tok, s["prompt"]) <= PROMPT_LEN and "Next change" in s["prompt"]
  probs, traj, stats = imagining.imagine(graphdef, params, tok, targets, records, k=3,
                                         how="mean", prompt_len=24, batch_size=BATCH, **DECISION)
  assert np.isnan(probs).all() and stats["imagined"] == 0 and stats["missing"] == 3
  assert stats["walks_failed"] == {"prompt_too_long": 5} and stats["scoring_calls"] == 0
  assert [w["failed"] for w in traj[0].details["walks"]] == ["prompt_too_long"] * 3


def test_direct_answers_only_when_given(policy, data):
  tok, graphdef, params = policy
  targets, records, _ = data
  direct = np.array([[0.3, 0.7, 0], [0.2, 0.3, 0.5], [0.9, 0.1, 0]])
  probs, traj, stats = imagining.imagine(graphdef, params, tok, targets, records[4:6], k=2,
                                         how="mean", prompt_len=PROMPT_LEN, batch_size=BATCH,
                                         direct_probs=direct, **DECISION)
  np.testing.assert_array_equal(probs[[0, 2]], direct[[0, 2]])
  assert not np.allclose(probs[1], direct[1])
  assert stats["fallback"] == 2 and stats["imagined"] == 1 and stats["missing"] == 0
  assert [t.details["answered_by"] for t in traj] == ["direct", "anchors", "direct"]
  with pytest.raises(ValueError, match="direct_probs"):
    imagining.imagine(graphdef, params, tok, targets, records, k=2, how="mean",
                      prompt_len=PROMPT_LEN, batch_size=BATCH, direct_probs=direct[:2], **DECISION)


def test_select_anchors_leaks_k_and_order(data):
  targets, records, _ = data
  chosen, skipped = imagining.select_anchors(targets, records, k=1)
  assert chosen == {0: [records[1]], 1: [records[4]]} and skipped["over_k"] == 4
  banned = {records[1].anchor.id}
  chosen, skipped = imagining.select_anchors(targets, records, k=2, exclude_anchor_ids=banned)
  assert skipped["anchor_is_eval"] == 1 and chosen[0] == [records[2], records[0]]
  own = records[4].replace(anchor=dataclasses.replace(records[4].anchor, id=targets[0].id))
  own = own.replace(id=f"chain:{targets[0].id}->{targets[1].id}")
  _, skipped = imagining.select_anchors(targets, [own], k=2)
  assert skipped["anchor_is_eval"] == 1
  trial = records[5].anchor.trial_id
  _, skipped = imagining.select_anchors(targets, records, k=7, exclude_anchor_trials={trial})
  assert skipped["anchor_is_eval"] == sum(r.anchor.trial_id == trial for r in records[:6]) > 0
  other = records[4].replace(options=records[4].options[::-1])
  _, skipped = imagining.select_anchors(targets, [other], k=2)
  assert skipped["options_differ"] == 1


def test_target_id_of_both_kinds(data):
  targets, records, _ = data
  assert imagining.chain_target_id(records[0]) == targets[0].id  # approximate_pair
  assert imagining.chain_target_id(records[4]) == targets[1].id  # chain
  for bad in (records[6], records[0].replace(id="approximate_pair:x->y")):
    with pytest.raises(ValueError, match=re.escape(repr(bad.id))):
      imagining.chain_target_id(bad)


def test_trajectories_page_shows_the_walks(policy, data):
  tok, graphdef, params = policy
  targets, records, _ = data
  _, traj, _ = imagining.imagine(graphdef, params, tok, targets, records, k=3, how="mean",
                                 prompt_len=PROMPT_LEN, batch_size=BATCH, **DECISION)
  page = report.trajectories_html(traj)
  walk = traj[0].details["walks"][0]
  assert page.count('class="walk"') == 5 and page.count("<tr><td>") == 8
  assert f"anchor {walk['anchor_id']}" in page and "&rarr;" in page
  assert "(no known factor differs)" in page and "no answer: no finished anchor walk" in page
  assert 'data-method="imagining"' in page
  row = traj[0].to_json()
  assert row["walks"][0]["steps"][0]["estimate"] in targets[0].options


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


def _routed(policy):
  """The tiny policy with three random adapters routed by factor (general, dose, population)."""
  import jax
  from deepimagine_jax import lora, sharding
  from deepimagine_jax.config import LoRAConfig
  tok, graphdef, params = policy
  lcfg = LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q", "v", "down"),
                    adapters=("general", "dose", "population"), route="factor")
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  gd, prm = lora.attach(graphdef, params, lcfg, mesh, 0)
  flat = nnx.to_flat_state(prm)
  rs = np.random.RandomState(0)
  for path, v in flat:  # B = 0 would make every adapter the base
    if path[-1] == "b":
      v.set_value(jax.numpy.asarray(rs.randn(*v.shape).astype(np.float32)))
  return lcfg, gd, nnx.from_flat_state(flat)


def test_each_step_is_scored_by_its_factors_local_operator(policy, data):
  """LoRA routed by factor (lora.route "factor"): step d of a walk runs with the adapter of
  its factor (the general one for a step with no known factor), as a one-walk loop does
  with that adapter made the active one."""
  tok = policy[0]
  lcfg, gd, prm = _routed(policy)
  targets, records, _ = data
  probs, traj, _ = imagining.imagine(gd, prm, tok, targets, records, k=3, how="mean",
                                     prompt_len=PROMPT_LEN, batch_size=BATCH, **DECISION)
  model = nnx.merge(gd, prm)
  with_active = {}
  for e in range(3):
    model.active_adapter = e
    with_active[e] = nnx.split(model)[0]
  route_of = {"dose": 1, "population": 2, "outcome": 0, "": 0}
  for i, recs in {0: [records[1], records[2], records[0]], 1: [records[4], records[5]]}.items():
    for w, r in zip(traj[i].details["walks"], recs):
      factors = [f.factor for f in r.factors] or [""]
      assert [s["adapter"] for s in w["steps"]] == [lcfg.adapters[route_of[f]] for f in factors]
      for s, f in zip(w["steps"], factors):
        step_ex = r.replace(prompt=s["prompt"])
        p = scoring.option_probs_by_scoring(with_active[route_of[f]], prm, tok, [step_ex],
                                            prompt_len=PROMPT_LEN, batch_size=1)[0, :r.n_options]
        np.testing.assert_allclose(s["probs"], p, atol=1e-5)  # a row gather vs one adapter
  model.active_adapter, model.lora_cfg = 0, dataclasses.replace(lcfg, route="active")
  plain, _, _ = imagining.imagine(nnx.split(model)[0], prm, tok, targets, records, k=3,
                                  how="mean", prompt_len=PROMPT_LEN, batch_size=BATCH, **DECISION)
  assert np.nanmax(np.abs(plain - probs)) > 1e-4  # the routed adapters change the answers


# Per-arm walks (walk="per_arm") ---------------------------------------------------

PER_ARM = dict(walk="per_arm", max_new_tokens=12)


def _written(d: int) -> tuple[float, float]:
  """The values the fake writer gives at step d."""
  return d + 1.5, 2.0 * d


def _fake_writer(calls):
  def sample_texts(graphdef, params, tokenizer, examples, **kw):
    calls.append({"n": len(examples), **{k: kw[k] for k in ("temperature", "adapters",
                                                            "max_new_tokens", "runs")}})
    steps = [int(ex.id.rsplit("#arms", 1)[1]) for ex in examples]
    return [[f"The change moves it. ESTIMATE: {_written(d)}" for d in steps]]
  return sample_texts


def _per_arm_one(policy, rec):
  """The reference: one per-arm walk on its own, the written values known in advance."""
  tok, graphdef, params = policy
  n_tokens = lambda text: _n_tokens(tok, text)
  state, prompts = templates.anchor_state(rec.anchor), []
  for d in range(templates.arm_estimate_steps(rec)):
    prompts.append(templates.render_arm_estimate_step(rec, d, state, n_tokens=n_tokens,
                                                      max_tokens=PROMPT_LEN)[0])
    state = templates.estimate_state(rec, *_written(d))
  compare = templates.render_arm_compare(rec, state, n_tokens=n_tokens, max_tokens=PROMPT_LEN)[0]
  assert all(n_tokens(x) <= PROMPT_LEN for x in prompts + [compare])
  p = scoring.option_probs_by_scoring(graphdef, params, tok, [rec.replace(prompt=compare)],
                                      prompt_len=PROMPT_LEN, batch_size=1)[0, :rec.n_options]
  return p, prompts + [compare]


def _with_anchor_values(records):
  """records[1]'s anchor given per-arm values, as a registry anchor has."""
  out = list(records)
  out[1] = out[1].replace(anchor=dataclasses.replace(
      out[1].anchor, arm_a="Anchor drug", arm_b="Anchor placebo", value_a=3.0, value_b=1.5,
      unit="mg"))
  return out


def test_per_arm_walk_matches_one_walk_at_a_time(policy, data, monkeypatch):
  """Each step's prompt carries the previous state (the anchor's sentence and values, then
  the values written), the writer is called once per depth, greedily, and each walk's
  comparison is scored as a lone walk scores it; targets without two arms are counted."""
  tok, graphdef, params = policy
  targets, records, _ = data
  records = _with_anchor_values(records)
  calls = []
  monkeypatch.setattr(scoring, "sample_texts", _fake_writer(calls))
  probs, traj, stats = imagining.imagine(graphdef, params, tok, targets, records, k=3,
                                         how="mean", prompt_len=PROMPT_LEN, batch_size=BATCH,
                                         **PER_ARM)
  walked = {0: [records[1], records[2], records[0]], 1: [records[4], records[5]]}
  armed = [i for i in walked if templates.compared_arms(targets[i]) is not None]
  assert armed == [0, 1]  # the sample's targets compare two arms
  for i, recs in walked.items():
    walks = traj[i].details["walks"]
    if i not in armed:
      assert np.isnan(probs[i]).all() and {w["failed"] for w in walks} == {"no_two_arms"}
      continue
    refs = [_per_arm_one(policy, r) for r in recs]
    n = targets[i].n_options
    np.testing.assert_allclose(probs[i, :n], _np_aggregate([p for p, _ in refs], "mean"),
                               rtol=1e-5, atol=1e-7)
    for w, r, (p_ref, prompts) in zip(walks, recs, refs):
      assert [s["prompt"] for s in w["steps"]] == prompts and not w["failed"]
      np.testing.assert_allclose(w["probs"], p_ref, rtol=1e-5, atol=1e-7)
      depth = templates.arm_estimate_steps(r)
      assert [s["values"] for s in w["steps"][:depth]] == [list(_written(d))
                                                           for d in range(depth)]
      assert w["steps"][0]["given"] == templates.anchor_state(r.anchor).text()
      assert w["steps"][-1]["factor"] == "compare" and w["steps"][-1]["probs"] is not None
  assert "Values: first arm (Anchor drug) 3 mg" in traj[0].details["walks"][0]["steps"][0][
      "prompt"]
  longest = max(templates.arm_estimate_steps(r) for i in armed for r in walked[i])
  assert len(calls) == stats["generation_calls"] == longest
  assert all(c["temperature"] == 0.0 and c["adapters"] is None and c["runs"] == 1
             and c["max_new_tokens"] == 12 for c in calls)
  assert stats["prompts_generated"] == sum(templates.arm_estimate_steps(r)
                                           for i in armed for r in walked[i])
  assert stats["scoring_calls"] == 1 and stats["walk"] == "per_arm"
  assert stats["imagined"] == len(armed) and stats["missing"] == 3 - len(armed)
  page = report.trajectories_html(traj)
  assert "compare" in page and 'class="walk"' in page
  # a question about no two arms (an endpoint met or not) has no per-arm walk: counted
  met = targets[0].replace(id="met", options=("This endpoint is met.",
                                              "This endpoint is not met."))
  rec = records[0].replace(id=f"approximate_pair:{records[0].anchor.id}->met",
                           options=met.options)
  probs, _, stats = imagining.imagine(graphdef, params, tok, [met], [rec], k=3, how="mean",
                                      prompt_len=PROMPT_LEN, batch_size=BATCH, **PER_ARM)
  assert np.isnan(probs).all() and stats["walks_failed"] == {"no_two_arms": 1}
  assert stats["generation_calls"] == stats["scoring_calls"] == 0


def test_per_arm_walk_counts_what_the_model_cannot_write(policy, data):
  """A random model writes no ESTIMATE line: every walk ends at its first step, counted,
  and no target is answered (nothing falls back)."""
  tok, graphdef, params = policy
  targets, records, _ = data
  probs, traj, stats = imagining.imagine(graphdef, params, tok, targets, records, k=3,
                                         how="mean", prompt_len=PROMPT_LEN, batch_size=BATCH,
                                         **PER_ARM)
  assert np.isnan(probs).all() and stats["imagined"] == 0 and stats["scoring_calls"] == 0
  assert stats["generation_calls"] == 1
  failed = stats["walks_failed"]
  assert sum(failed.values()) == stats["walks"] == 5
  assert set(failed) <= {"estimate_unparsed", "no_two_arms"} and failed["estimate_unparsed"]
  for t in traj:
    for w in t.details["walks"]:
      if w["failed"] == "estimate_unparsed":
        (step,) = w["steps"]
        assert step["values"] is None and step["estimate"] == step["text"]
  with pytest.raises(ValueError, match="max_new_tokens"):
    imagining.imagine(graphdef, params, tok, targets, records, k=3, how="mean",
                      prompt_len=PROMPT_LEN, batch_size=BATCH, walk="per_arm", max_new_tokens=0)
  with pytest.raises(ValueError, match="eval.max_new_tokens 40 exceeds the model's max_seq_len"):
    imagining.imagine(graphdef, params, tok, targets, records, k=3, how="mean",
                      prompt_len=PROMPT_LEN, batch_size=BATCH, walk="per_arm", max_new_tokens=40)
  with pytest.raises(ValueError, match="eval.walk"):
    imagining.imagine(graphdef, params, tok, targets, records, k=3, how="mean",
                      prompt_len=PROMPT_LEN, batch_size=BATCH, walk="both", max_new_tokens=4)


def test_written_estimates_use_each_examples_adapter(policy, data):
  """sample_texts with per-example adapters writes what the model with that adapter made
  the active one writes (greedy), as the per-arm walk's steps route by factor."""
  tok = policy[0]
  lcfg, gd, prm = _routed(policy)
  targets, _, _ = data
  exs = [targets[i % len(targets)] for i in range(5)]
  adapters = [0, 1, 2, 1, 0]
  kw = dict(runs=1, temperature=0.0, max_new_tokens=6, batch_size=4, prompt_len=PROMPT_LEN,
            seed=0)
  (routed,) = scoring.sample_texts(gd, prm, tok, exs, adapters=adapters, **kw)
  model = nnx.merge(gd, prm)
  by_adapter = {}
  for e in range(3):
    model.active_adapter = e
    (by_adapter[e],) = scoring.sample_texts(nnx.split(model)[0], prm, tok, exs, **kw)
  assert routed == [by_adapter[a][j] for j, a in enumerate(adapters)]
  assert len({tuple(v) for v in by_adapter.values()}) > 1  # the adapters write differently
