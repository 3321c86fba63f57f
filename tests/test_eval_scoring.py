"""Policy evaluation on real CT Open questions with a tiny random model.

Scoring is checked against a plain loop that runs the model once per
(question, option) on the unpadded sequence; sampling against the parser.
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
from deepimagine_jax import rewards
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


def test_scoring_batch_size_does_not_matter(policy, tok, questions):
  _, graphdef, params = policy
  a = scoring.option_probs_by_scoring(graphdef, params, tok, questions,
                                         prompt_len=PROMPT_LEN, batch_size=8)
  b = scoring.option_probs_by_scoring(graphdef, params, tok, questions[::-1],
                                         prompt_len=PROMPT_LEN, batch_size=8)
  np.testing.assert_allclose(a, b[::-1], rtol=1e-5, atol=1e-7)


def test_scoring_rejects_unrendered(policy, tok, questions):
  _, graphdef, params = policy
  with pytest.raises(ValueError, match="prompt"):
    scoring.option_probs_by_scoring(graphdef, params, tok, [questions[0].replace(prompt="")],
                                       prompt_len=PROMPT_LEN, batch_size=8)


def test_sampling_runs_and_failures(policy, tok, questions):
  _, graphdef, params = policy
  probs_runs, texts_runs, failures = scoring.option_probs_by_sampling(
      graphdef, params, tok, questions, runs=2, temperature=1.0, max_new_tokens=8,
      batch_size=8, prompt_len=PROMPT_LEN, seed=0)
  assert len(probs_runs) == len(texts_runs) == 2
  n_fail = 0
  for probs, texts in zip(probs_runs, texts_runs):
    assert probs.shape == (len(questions), 3) and len(texts) == len(questions)
    for q, p, t in zip(questions, probs, texts):
      n = q.n_options
      d = rewards.parse_decision(t, n)
      expect = d.probs if d.ok else np.full(n, 1.0 / n)
      n_fail += not d.ok
      np.testing.assert_allclose(p[:n], expect)
  assert sum(failures.values()) == n_fail
  assert texts_runs[0] != texts_runs[1]  # each run draws its own samples


def test_sampling_parse_accounting(monkeypatch, policy, tok, questions):
  """A fake sampler emits known texts: parsed ones give their scores, others uniform."""
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
  probs_runs, texts_runs, failures = scoring.option_probs_by_sampling(
      graphdef, params, tok, questions, runs=1, temperature=1.0, max_new_tokens=20,
      batch_size=8, prompt_len=PROMPT_LEN, seed=0)
  assert [q.n_options for q in questions] == [2, 2, 3, 2, 3]
  assert texts_runs[0] == texts
  p = probs_runs[0]
  np.testing.assert_allclose(p[0, :2], [0.2, 0.8])
  np.testing.assert_allclose(p[1, :2], [0.5, 0.5])
  np.testing.assert_allclose(p[2], [0.25, 0.5, 0.25])
  np.testing.assert_allclose(p[3, :2], [0.75, 0.25])
  np.testing.assert_allclose(p[4], [1 / 3] * 3)
  assert sum(failures.values()) == 2 and "unparsed:wrong_count" in failures


def _cfg(mode):
  return typed_configs.eval_(mode=mode, runs=2, temperature=1.0, max_new_tokens=8, batch_size=8)


def test_evaluate_policy_score(policy, tok, questions):
  _, graphdef, params = policy
  scores, traj, preds_runs = scoring.evaluate_policy(
      graphdef, params, tok, questions, _cfg("score"), prompt_len=PROMPT_LEN)
  probs = scoring.option_probs_by_scoring(graphdef, params, tok, questions,
                                             prompt_len=PROMPT_LEN, batch_size=8)
  ref = metrics.score_questions(questions, scoring.trimmed(probs, questions))
  for cat in ref:
    for m in metrics.METRICS:
      assert scores[cat][m] == pytest.approx(ref[cat][m])
  assert len(preds_runs) == 1 and len(traj) == len(questions)
  rescored = predictions.score_predictions(questions, preds_runs)
  assert rescored["overall"]["cross_entropy"] == pytest.approx(ref["overall"]["cross_entropy"])
  for t, q, p in zip(traj, questions, probs):
    n = q.n_options
    assert t.completion == templates.decision_line(n, int(np.argmax(p[:n])))
    assert t.correct == (int(np.argmax(p[:n])) == q.label)
    assert set(t.to_json()) >= {"id", "prompt", "completion", "probs", "label", "correct",
                                "perturbation", "category"}


def test_evaluate_policy_sample(policy, tok, questions):
  _, graphdef, params = policy
  scores, traj, preds_runs = scoring.evaluate_policy(
      graphdef, params, tok, questions, _cfg("sample"), prompt_len=PROMPT_LEN)
  assert len(preds_runs) == 2 and len(traj) == 2 * len(questions)
  assert scores["overall"]["runs"] == 2
  rescored = predictions.score_predictions(questions, preds_runs)
  for m in metrics.METRICS:
    assert rescored["overall"][m] == pytest.approx(scores["overall"][m])
  n_unparsed = sum(t.probs is None for t in traj)
  assert sum(scores["overall"]["failures"].values()) == n_unparsed
  assert sum(v for k, v in rescored["overall"]["failures"].items() if k != "missing") == n_unparsed
  with pytest.raises(ValueError, match="mode"):
    scoring.evaluate_policy(graphdef, params, tok, questions, _cfg("beam"),
                            prompt_len=PROMPT_LEN)
