"""Policy evaluation on real CT Open questions with a tiny random model.

Scoring is checked against a plain loop that runs the model once per
(question, option) on the unpadded sequence; sampling's texts against the parser,
failures counted and never answered.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipeline import templates
from data_pipeline.build_report import BuildReport
from data_pipeline.readers import ct_open
from deepimagine_jax import model as M
from deepimagine_jax import sampler
from deepimagine_jax.config import ModelConfig
from deepimagine_jax.eval import metrics, predictions, scoring
from deepimagine_jax.tokenizer import Tokenizer
import typed_configs

PROMPT_LEN = 128


@pytest.fixture(scope="module")
def summer(data_root):
  return ct_open.read_questions(data_root / "ct_open" / "Summer_2025.pickle", BuildReport(),
                                split="eval")


@pytest.fixture(scope="module")
def questions(summer):
  two = [q for q in summer if q.n_options == 2][:3]
  three = [q for q in summer if q.n_options == 3][:2]
  qs = [templates.render(q) for q in (two[:2] + three[:1] + two[2:] + three[1:])]
  qs[3] = qs[3].replace(prompt=qs[3].prompt[-120:])  # shorter than PROMPT_LEN tokens: left padding
  return qs


@pytest.fixture(scope="module")
def tok(tmp_path_factory, summer):
  texts = [templates.render(q).prompt for q in summer[::10]]
  texts += [templates.decision_line(n, i) for n in (2, 3) for i in range(n)]
  return Tokenizer.train(texts, tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.fixture(scope="module")
def policy(tok):
  cfg = ModelConfig.tiny().replace(vocab_size=tok.vocab_size, tie_embeddings=False)
  model = M.Transformer(cfg, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  return model, graphdef, params


@jax.jit
def _forward(graphdef, params, seq_1T):
  """A plain causal forward from position 0: no left padding, no masks, no cache."""
  T = seq_1T.shape[1]
  return nnx.merge(graphdef, params)(seq_1T, jnp.arange(T)[None])[0][0]


def _reference_logp(graphdef, params, tok, prompt, candidate):
  """log p(candidate + EOS | [BOS] prompt) from one unbatched sequence.

  Right-padded to a fixed 160 tokens so one compile serves every call; causality
  keeps the padding out of the logits that are read.
  """
  p = tok.encode(prompt)
  p = p[len(p) - (PROMPT_LEN - 1):] if len(p) > PROMPT_LEN - 1 else p  # rl_prompt's cut
  c = tok.encode(candidate) + [tok.eos_id]
  seq = [tok.bos_id] + p + c
  padded = np.zeros((1, 160), np.int32)
  padded[0, :len(seq)] = seq
  logits = np.asarray(_forward(graphdef, params, jnp.asarray(padded)), np.float64)
  logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  start = len(seq) - len(c)
  return sum(logp[t - 1, seq[t]] for t in range(start, len(seq)))


def test_scoring_matches_per_candidate_loop(policy, tok, questions):
  model, graphdef, params = policy
  probs = scoring.option_probs_by_scoring(graphdef, params, tok, questions,
                                             prompt_len=PROMPT_LEN, batch_size=8)
  assert probs.shape == (len(questions), 3)
  for q, p in zip(questions, probs):
    n = q.n_options
    lp = np.array([_reference_logp(graphdef, params, tok, q.prompt, templates.decision_line(n, i))
                   for i in range(n)])
    ref = np.exp(lp - np.logaddexp.reduce(lp))
    np.testing.assert_allclose(p[:n], ref, rtol=2e-4, atol=1e-6)
    assert np.all(p[n:] == 0)
    assert np.all(p >= 0) and abs(p.sum() - 1) < 1e-9
  # a random model still tells its candidates apart
  assert np.ptp(probs[1, :2]) > 1e-6
  assert np.all(probs >= 0) and np.allclose(probs.sum(1), 1)


def test_option_logprobs_match_one_forward_per_option(policy):
  """Array level: left-padded prompts of different lengths (one unpadded), 2- and
  3-option questions, candidates of different lengths right-padded; each real
  (question, option) against its own unpadded sequence, log-softmax in float64."""
  _, graphdef, params = policy
  rng = np.random.default_rng(0)
  V = params["embed_VD"].shape[0]
  P, O, C = 24, scoring.MAX_OPTIONS, 7
  prompt_len = [24, 9, 17, 1, 20]
  n_options = [2, 3, 3, 2, 3]
  cand_len = [[3, 7], [1, 5, 2], [7, 7, 4], [2, 6], [4, 1, 6]]
  Q = len(prompt_len)
  prompt, pmask = np.zeros((Q, P), np.int32), np.zeros((Q, P), np.int32)
  cand, cmask = np.zeros((Q, O, C), np.int32), np.zeros((Q, O, C), np.int32)
  for q in range(Q):
    prompt[q, P - prompt_len[q]:] = rng.integers(1, V, prompt_len[q])
    pmask[q, P - prompt_len[q]:] = 1
    prompt[q, :P - prompt_len[q]] = rng.integers(1, V, P - prompt_len[q])  # masked: inert
    for o, c in enumerate(cand_len[q]):
      cand[q, o] = rng.integers(1, V, C)  # tokens past the end are masked out: inert
      cmask[q, o, :c] = 1
  logp_QO = np.asarray(scoring.option_logprobs(graphdef, params, *map(
      jnp.asarray, (prompt, pmask, cand, cmask))))
  assert logp_QO.shape == (Q, O)
  for q in range(Q):
    assert np.all(logp_QO[q, n_options[q]:] == 0)  # an empty slot scores 0
    for o, c in enumerate(cand_len[q]):
      seq = list(prompt[q, P - prompt_len[q]:]) + list(cand[q, o, :c])
      padded = np.zeros((1, 160), np.int32)
      padded[0, :len(seq)] = seq
      logits = np.asarray(_forward(graphdef, params, jnp.asarray(padded)), np.float64)
      logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
      ref = sum(logp[t - 1, seq[t]] for t in range(prompt_len[q], len(seq)))
      np.testing.assert_allclose(logp_QO[q, o], ref, rtol=1e-5, atol=1e-4)
  # different candidates of one prompt get different scores (the fan-out is not a copy of row 0)
  assert len(set(np.round(logp_QO[1], 3))) == 3


def test_scoring_batch_size_does_not_matter(policy, tok, questions):
  _, graphdef, params = policy
  a = scoring.option_probs_by_scoring(graphdef, params, tok, questions,
                                         prompt_len=PROMPT_LEN, batch_size=8)
  b = scoring.option_probs_by_scoring(graphdef, params, tok, questions[::-1],
                                         prompt_len=PROMPT_LEN, batch_size=8)
  np.testing.assert_allclose(a, b[::-1], rtol=1e-5, atol=1e-7)


def test_scoring_trims_shared_left_padding(monkeypatch, policy, tok, questions):
  """Ten questions, five of them cut short, in batches of 8, longest prompt first:
  the batch of short prompts runs on PROMPT_BUCKET slots, and every question
  still matches its own unpadded forward."""
  _, graphdef, params = policy
  qs = list(questions) + [q.replace(id=q.id + "-short", prompt=q.prompt[-60:])
                          for q in questions]
  assert max(len(tok.encode(q.prompt)) + 1 for q in qs[5:]) <= scoring.PROMPT_BUCKET
  widths, original = [], scoring.option_logprobs

  def spy(graphdef, params, prompt_QP, *rest):
    widths.append(prompt_QP.shape[1])
    return original(graphdef, params, prompt_QP, *rest)

  monkeypatch.setattr(scoring, "option_logprobs", spy)
  probs = scoring.option_probs_by_scoring(graphdef, params, tok, qs, prompt_len=PROMPT_LEN,
                                          batch_size=8)
  assert widths == [PROMPT_LEN, scoring.PROMPT_BUCKET]
  for q, p in zip(qs, probs):
    n = q.n_options
    lp = np.array([_reference_logp(graphdef, params, tok, q.prompt, templates.decision_line(n, i))
                   for i in range(n)])
    np.testing.assert_allclose(p[:n], np.exp(lp - np.logaddexp.reduce(lp)), rtol=2e-4, atol=1e-6)


def test_scoring_rejects_unrendered(policy, tok, questions):
  _, graphdef, params = policy
  with pytest.raises(ValueError, match="prompt"):
    scoring.option_probs_by_scoring(graphdef, params, tok, [questions[0].replace(prompt="")],
                                       prompt_len=PROMPT_LEN, batch_size=8)


def test_sampling_runs(policy, tok, questions):
  _, graphdef, params = policy
  texts_runs = scoring.sample_texts(graphdef, params, tok, questions, runs=2, temperature=1.0,
                                    max_new_tokens=8, batch_size=8, prompt_len=PROMPT_LEN, seed=0)
  assert len(texts_runs) == 2 and all(len(t) == len(questions) for t in texts_runs)
  assert texts_runs[0] != texts_runs[1]  # each run draws its own samples
  with pytest.raises(ValueError, match="eval.runs"):
    scoring.sample_texts(graphdef, params, tok, questions, runs=0, temperature=1.0,
                         max_new_tokens=8, batch_size=8, prompt_len=PROMPT_LEN, seed=0)


def test_sampled_failures_are_counted_never_answered(monkeypatch, policy, tok, questions):
  """A fake sampler emits known texts: parsed ones give their scores; the others are
  counted failures, left out of the benchmark table and wrong in the strict one."""
  texts = ["DECISION: (0.2, 0.8)", "no decision here", "DECISION: (1, 2, 1)",
           "DECISION: (3, 1)", "DECISION: (1, 1)"]  # the last is wrong_count for 3 options
  _, graphdef, params = policy

  def fake_sample(graphdef, params, tok_BP, mask_BP, key, *, max_new_tokens, **kw):
    B = tok_BP.shape[0]
    out = np.zeros((B, max_new_tokens), np.int32)
    lengths = np.zeros(B, np.int32)
    for b in range(B):
      ids = tok.encode(texts[b % len(texts)]) + [tok.eos_id]
      out[b, :len(ids)], lengths[b] = ids, len(ids)
    return sampler.SampleOutput(out, lengths, None, None, None, None)

  monkeypatch.setattr(sampler, "sample", fake_sample)
  cfg = typed_configs.eval_(mode="sample", runs=1, temperature=1.0, max_new_tokens=20,
                            batch_size=8)
  traj, preds_runs = scoring.evaluate_policy(graphdef, params, tok, questions, cfg,
                                             prompt_len=PROMPT_LEN)
  assert [q.n_options for q in questions] == [2, 2, 3, 2, 3]
  assert list(preds_runs[0].values()) == texts
  assert [t.probs is None for t in traj[:5]] == [False, True, False, False, True]
  np.testing.assert_allclose(traj[2].probs, [0.25, 0.5, 0.25])
  answers, failures = predictions.answers_from_predictions(questions, preds_runs[0])
  assert [a is None for a in answers] == [False, True, False, False, True]
  assert failures == {"unparsed:no_decision_line": 1, "unparsed:wrong_count": 1}
  scores = predictions.score_predictions(questions, preds_runs)
  assert scores["overall"]["answered"] == 3 and scores["overall"]["asked"] == 5
  assert scores["overall"]["coverage"] == pytest.approx(0.6)
  assert scores["overall"]["failures"] == failures


def _cfg(mode):
  return typed_configs.eval_(mode=mode, runs=2, temperature=1.0, max_new_tokens=8, batch_size=8)


def test_evaluate_policy_score(policy, tok, questions):
  _, graphdef, params = policy
  traj, preds_runs = scoring.evaluate_policy(
      graphdef, params, tok, questions, _cfg("score"), prompt_len=PROMPT_LEN)
  probs = scoring.option_probs_by_scoring(graphdef, params, tok, questions,
                                             prompt_len=PROMPT_LEN, batch_size=8)
  ref = metrics.score_run(questions, scoring.trimmed(probs, questions))
  assert len(preds_runs) == 1 and len(traj) == len(questions)
  rescored = predictions.score_predictions(questions, preds_runs)
  for cat in ref:
    for m in metrics.METRICS:
      assert rescored[cat][m] == pytest.approx(ref[cat][m], abs=1e-12)
  assert rescored["overall"]["coverage"] == 1.0
  for t, q, p in zip(traj, questions, probs):
    n = q.n_options
    assert t.completion == templates.decision_line(n, int(np.argmax(p[:n])))
    assert t.correct == (int(np.argmax(p[:n])) == q.label)
    assert set(t.to_json()) >= {"id", "prompt", "completion", "probs", "label", "correct",
                                "perturbation", "category"}


def test_evaluate_policy_sample(policy, tok, questions):
  _, graphdef, params = policy
  traj, preds_runs = scoring.evaluate_policy(
      graphdef, params, tok, questions, _cfg("sample"), prompt_len=PROMPT_LEN)
  assert len(preds_runs) == 2 and len(traj) == 2 * len(questions)
  scores = predictions.score_predictions(questions, preds_runs)
  assert scores["overall"]["runs"] == 2
  n_unparsed = sum(t.probs is None for t in traj)
  assert sum(scores["overall"]["failures"].values()) == n_unparsed
  assert scores["overall"]["answered"] * 2 == pytest.approx(2 * len(questions) - n_unparsed)
  with pytest.raises(ValueError, match="mode"):
    scoring.evaluate_policy(graphdef, params, tok, questions, _cfg("beam"),
                            prompt_len=PROMPT_LEN)


def test_scoring_shards_over_the_mesh_the_parameters_live_on(monkeypatch, policy, tok,
                                                             questions):
  """Parameters on the 8-device mesh: scoring runs under that mesh (each batch split over the
  devices, not computed whole on every device) and answers as on one device."""
  from deepimagine_jax import sharding
  _, graphdef, params = policy
  mesh = sharding.make_mesh(-1, 1, 1)
  on_mesh = jax.device_put(params, sharding.replicated(mesh))
  seen = []
  real = scoring.option_logprobs
  monkeypatch.setattr(scoring, "option_logprobs",
                      lambda *a: seen.append(jax.sharding.get_abstract_mesh()) or real(*a))
  sharded = scoring.option_probs_by_scoring(graphdef, on_mesh, tok, questions,
                                            prompt_len=PROMPT_LEN, batch_size=8)
  assert seen and all(m == mesh.abstract_mesh for m in seen)
  single = scoring.option_probs_by_scoring(graphdef, params, tok, questions,
                                           prompt_len=PROMPT_LEN, batch_size=8)
  np.testing.assert_allclose(sharded, single, atol=1e-5)
  with sharding.on_params_mesh(params):  # one device: no mesh
    assert jax.sharding.get_abstract_mesh().empty
  other = sharding.make_mesh(2, 4, 1)
  with jax.set_mesh(other), sharding.on_params_mesh(on_mesh):  # a mesh already set stays
    assert jax.sharding.get_abstract_mesh() == other.abstract_mesh
