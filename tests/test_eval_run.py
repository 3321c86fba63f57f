"""The evaluation entry: baselines + model + imagining on real CT Open, files that score back."""
import json

import numpy as np
import pytest
from flax import nnx

from data_pipeline import facts, pairs, templates
from data_pipeline.build_report import BuildReport
from data_pipeline.example import Example, Factor
from data_pipeline.readers import ct_open
from deepimagine_jax import model as M
from deepimagine_jax import rewards
from deepimagine_jax.config import ModelConfig
from deepimagine_jax.eval import baselines as baselines_mod
from deepimagine_jax.eval import metrics, predictions, report, run
from deepimagine_jax.tokenizer import Tokenizer
import typed_configs

PROMPT_LEN = 192  # step prompts are fitted to it (a 1000-piece tokenizer: ~1 token / 2 chars)
N_EVAL = 30
N_MODEL = 4


@pytest.fixture(scope="module")
def built(data_root):
  summer = ct_open.read_questions(data_root / "ct_open" / "Summer_2025.pickle", BuildReport(),
                                  split="eval")[:N_EVAL]
  winter = ct_open.read_questions(data_root / "ct_open" / "Winter_2025.pickle", BuildReport(),
                                  split="train")[:200]  # enough to fit; the CV stays quick
  target = templates.render(summer[0])  # model_subset always keeps the first
  anchors = [q for q in winter if q.n_options == target.n_options][:2]
  steps = [Factor("dose", "10 mg", "20 mg")]
  chains = [pairs.make_pair(a, target, "chain", steps) for a in anchors]
  # an anchor from the eval release must never be used, even outside max_questions
  chains.append(pairs.make_pair(summer[-1], target, "chain", steps))
  return {"train": winter + chains, "eval": summer}


@pytest.fixture(scope="module")
def policy(built, tmp_path_factory):
  texts = [templates.render(q).prompt for q in built["eval"]]
  texts += [templates.decision_line(n, i) for n in (2, 3) for i in range(n)]
  tok = Tokenizer.train(texts, tmp_path_factory.mktemp("tok"), vocab_size=1000)
  cfg = ModelConfig.tiny().replace(vocab_size=tok.vocab_size, tie_embeddings=False)
  graphdef, params = nnx.split(M.Transformer(cfg, nnx.Rngs(0)))
  return tok, graphdef, params


def _cfg(**kw):
  return typed_configs.eval_(**{**dict(
      mode="score", runs=2, temperature=1.0, max_new_tokens=8, batch_size=8,
      max_questions=N_MODEL, imagining=True, imagining_k=2, aggregate="mean", baselines=True,
      rf_seeds=(0,), cv_folds=2, checkpoint="", pair_eval=False), **kw})


def _same(a, b):
  for cat in a:
    for m in metrics.METRICS:
      assert a[cat][m] == pytest.approx(b[cat][m], nan_ok=True), (cat, m)


def test_evaluate_score_mode(policy, built, tmp_path, capsys):
  tok, graphdef, params = policy
  results = run.evaluate(graphdef, params, tok, built, _cfg(), prompt_len=PROMPT_LEN,
                         workdir=tmp_path, metrics_logs=[tmp_path / "missing.jsonl"])
  assert set(results) == {"uniform", "majority", "logreg_tfidf", "random_forest_tfidf",
                          "model_score", "copy_anchors", "model_imagining"}
  questions = run.eval_questions(built)
  # one target has anchors: imagining answers it alone, the rest counted as missing
  answered = {"model_score": N_MODEL, "model_imagining": 1, "copy_anchors": 1}
  for name, r in results.items():  # every result over every eval question, coverage beside it
    assert r["overall"]["asked"] == N_EVAL, name
    want = answered.get(name, N_EVAL)
    assert r["overall"]["answered"] == r["overall"]["n"] == want, name
    assert r["overall"]["coverage"] == pytest.approx(want / N_EVAL), name
    for suffix in (".pkl", ".jsonl"):  # the files are what was scored
      runs = [predictions.read_predictions(p) for p in
              sorted((tmp_path / "eval").glob(f"predictions_{name}_run*{suffix}"))]
      assert len(runs) == r["overall"].get("runs", 1) and len(runs[0]) == want
      _same(r, predictions.score_predictions(questions, runs))
  saved = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert saved["strict"]["model_score"]["overall"]["n"] == N_EVAL
  assert saved["baselines"]["logreg_tfidf"]["params"] in [dict(g) for g in baselines_mod.LR_GRID]
  stats = results["model_imagining"]["overall"]["imagining"]
  assert stats["imagined"] == 1 and stats["missing"] == N_MODEL - 1 and stats["walks"] == 2
  assert stats["targets"] == N_MODEL and stats["no_anchors"] == N_MODEL - 1
  assert stats["skipped"]["anchor_is_eval"] == 1 and stats["walks_failed"] == {}
  copy = results["copy_anchors"]["overall"]["imagining"]
  assert copy["imagined"] == 1 and copy["targets"] == N_EVAL and copy["skipped"]["anchor_is_eval"] == 1
  rows = [json.loads(l) for l in
          (tmp_path / "eval" / "trajectories_model_imagining.jsonl").read_text().splitlines()]
  assert len(rows) == N_MODEL and {r["method"] for r in rows} == {"imagining"}
  assert [len(r["walks"]) for r in rows] == [2] + [0] * (N_MODEL - 1)
  assert [r["answered_by"] for r in rows] == ["anchors"] + ["none"] * (N_MODEL - 1)
  for w in rows[0]["walks"]:
    assert w["steps"][0]["given"] == w["anchor_result"] and w["steps"][0]["factor"] == "dose"
    assert "Next change (step 1 of 1)" in w["steps"][0]["prompt"]
  # the answer scored is the walks' mean decision, in the prediction files
  mean = np.mean([w["probs"] for w in rows[0]["walks"]], axis=0)
  np.testing.assert_allclose(rows[0]["probs"], mean / mean.sum(), rtol=1e-9)
  preds = predictions.read_predictions(tmp_path / "eval" / "predictions_model_imagining_run0.pkl")
  assert list(preds) == [predictions.question_key(questions[0])]
  # copy-the-anchor: each usable anchor's outcome class at the rate the training records
  # agree with their anchors (add-one smoothed), the two anchors' answers averaged
  train = [ex for ex in built["train"] if ex.kind == "chain"]
  cls = baselines_mod.outcome_class
  rate = (sum(cls(c) == cls(c.anchor) for c in train) + 1) / (len(train) + 2)
  pos = baselines_mod.positive_index(questions[0].options)
  assert questions[0].n_options == 2
  want = np.zeros(2)
  for c in train[:2]:  # the Summer-anchored third is never used
    p_pos = rate if cls(c.anchor) else 1 - rate
    want[pos] += p_pos / 2
    want[1 - pos] += (1 - p_pos) / 2
  copy_preds = predictions.read_predictions(tmp_path / "eval" / "predictions_copy_anchors_run0.pkl")
  assert list(copy_preds) == [predictions.question_key(questions[0])]
  got = rewards.parse_decision(copy_preds[predictions.question_key(questions[0])],
                               questions[0].n_options).probs
  np.testing.assert_allclose(got, want, rtol=1e-12)
  for f in report.FILES:
    assert (tmp_path / "report" / f).is_file(), f
  page = (tmp_path / "report" / "trajectories.html").read_text()
  assert page.count('class="walk"') == 2 and "dose: 10 mg &rarr; 20 mg" in page
  summary = json.loads((tmp_path / "report" / "metrics.json").read_text())
  assert summary["calibration"]["n_trajectories"] == 2 * N_MODEL
  assert saved["imagining"]["model_imagining"]["imagined"] == 1
  out = capsys.readouterr().out
  assert f"[{N_MODEL}/{N_EVAL}]" in out and f"[{N_EVAL}/{N_EVAL}]" in out and "Strict" in out
  assert f"[1/{N_EVAL}]" in out
  assert f"model_imagining: answered through anchors 1 of {N_MODEL} asked" in out


def test_evaluate_sample_mode_runs(policy, built, tmp_path):
  tok, graphdef, params = policy
  results = run.evaluate(graphdef, params, tok, built,
                         _cfg(mode="sample", baselines=False, imagining=False),
                         prompt_len=PROMPT_LEN, workdir=tmp_path)
  assert set(results) == {"model_sample"}
  runs = [predictions.read_predictions(tmp_path / "eval" / f"predictions_model_sample_run{r}.pkl")
          for r in range(2)]
  _same(results["model_sample"], predictions.score_predictions(run.eval_questions(built), runs))
  assert results["model_sample"]["overall"]["runs"] == 2
  answered = results["model_sample"]["overall"]["answered"]
  failures = sum(results["model_sample"]["overall"]["failures"].values())
  assert 2 * answered + failures == 2 * N_EVAL  # each run: answered + missing + unparsed


def test_model_subset_spreads():
  qs = [Example(id=str(i), source="ct_open", kind="question", trial_id="NCT0",
                options=("a", "b"), label=0) for i in range(10)]
  assert [q.id for q in run.model_subset(qs, 4)] == ["0", "3", "6", "9"]
  assert run.model_subset(qs, 0) == qs and run.model_subset(qs, 50) == qs


def test_evaluate_baselines_only(built, tmp_path, capsys):
  results = run.evaluate(None, None, None, built, _cfg(max_questions=0), prompt_len=PROMPT_LEN,
                         workdir=tmp_path)
  assert set(results) == {"uniform", "majority", "logreg_tfidf", "random_forest_tfidf",
                          "copy_anchors"}
  assert "| uniform |" in capsys.readouterr().out
  assert len(list((tmp_path / "eval").glob("predictions_uniform_run0.*"))) == 2
  assert results["uniform"]["overall"]["n"] == N_EVAL
  with pytest.raises(ValueError, match="eval"):
    run.evaluate(None, None, None, {"train": built["train"]}, _cfg(), prompt_len=PROMPT_LEN,
                 workdir=tmp_path)


def _pairs(questions, kind_cycle, split_tag):
  """Real CT Open questions as pair targets, each anchored on the next same-shape question."""
  out = []
  for i, target in enumerate(questions):
    anchor = next((q for q in questions[i + 1:] + questions[:i]
                   if q.n_options == target.n_options), None)
    if anchor is None:
      continue
    factor = facts.FACTORS[i % len(facts.FACTORS)]
    steps = [Factor(factor, "a", "b")]
    ex = pairs.make_pair(anchor, templates.render(target), kind_cycle[i % len(kind_cycle)],
                         steps)
    out.append(ex.replace(split=split_tag))
  return out


@pytest.fixture(scope="module")
def built_pairs(built):
  winter = [q for q in built["train"] if q.kind == "question"]
  kinds = ("natural_pair", "approximate_pair")
  train_p = _pairs(winter[:60], kinds, "train")
  rl_p = _pairs(winter[60:80], kinds, "rl")
  dev_p = _pairs(winter[80:100], kinds, "dev")  # held out: never trains the pair baselines
  eval_p = _pairs(built["eval"][:N_PAIRS], kinds, "eval")
  eval_p[1] = eval_p[1].replace(category="")  # no category: falls back to "<n>-way/pair"
  bad_factor = eval_p[2].replace(perturbation="weather")
  neutral = train_p[0].replace(options=("A has a higher value than B.",
                                        "B has a higher value than A."), label=0)
  chain = eval_p[3].replace(kind="chain")
  return {"train": built["train"] + train_p + [neutral], "rl": rl_p, "dev": dev_p,
          "eval": built["eval"] + eval_p + [bad_factor, chain]}, train_p + rl_p, eval_p


N_PAIRS = 12
N_MODEL_PAIRS = 5


def test_evaluate_pairs(policy, built_pairs, tmp_path, capsys):
  tok, graphdef, params = policy
  data, train_p, eval_p = built_pairs
  results = run.evaluate(graphdef, params, tok, data,
                         _cfg(imagining=False, pair_eval=True, max_pairs=N_MODEL_PAIRS),
                         prompt_len=PROMPT_LEN, workdir=tmp_path)
  pair_names = {"pairs/" + n for n in (
      "copy_anchor", "logreg_tfidf", "logreg_tfidf+anchor", "random_forest_tfidf",
      "random_forest_tfidf+anchor", "model_score", "model_score+anchor")}
  assert pair_names <= set(results)
  for name in pair_names:
    overall = results[name]["overall"]
    for m in metrics.METRICS:
      assert np.isfinite(overall[m]), (name, m)
    assert 0.0 <= overall["balanced_accuracy"] <= 1.0 and overall["cross_entropy"] > 0
    want_n = N_MODEL_PAIRS if "model" in name else len(eval_p)
    assert overall["n"] == want_n and overall["asked"] == len(eval_p), name
  assert f"{eval_p[1].n_options}-way/pair" in results["pairs/logreg_tfidf"], (
      eval_p[1].category, eval_p[1].id, list(results["pairs/logreg_tfidf"]))

  # the baselines: trained on train + rl pairs only (dev held out, neutral pair skipped)
  expect_eval = run.pair_examples({"eval": eval_p}, ["eval"])
  direct, _ = baselines_mod.pair_baselines(train_p, expect_eval, (0,), folds=2)
  for k, v in direct.items():
    _same(results["pairs/" + k], metrics.score_runs(expect_eval, v))
  info = json.loads((tmp_path / "eval" / "results.json").read_text())["pairs"]
  assert info["train_pairs"] == len(train_p) and info["eval_pairs"] == len(eval_p)
  assert info["skipped"] == {"eval:unknown_perturbation": 1, "train:target_outcome_class": 1}

  # the model: max_pairs evenly spread pairs, without the anchor (the target question
  # alone) and with it; the trajectories' probabilities score back
  subset = run.model_subset(expect_eval, N_MODEL_PAIRS)
  for name, anchored in (("model_score", False), ("model_score+anchor", True)):
    traj = [json.loads(l) for l in (tmp_path / "eval" / f"trajectories_pairs_{name}.jsonl")
            .read_text().splitlines()]
    assert [t["pair_id"] for t in traj] == [ex.id for ex in subset]
    assert all(("Observed:" in t["prompt"]) == anchored for t in traj), name
    answers = run.answers_over(subset, [t["probs"] for t in traj], expect_eval)
    _same(results["pairs/" + name], metrics.score_runs(expect_eval, [answers]))
    for t in traj:
      assert sum(t["probs"]) == pytest.approx(1.0)

  out = capsys.readouterr().out
  assert "Counterfactual pairs (eval split)" in out and "| pairs/model_score+anchor |" in out
  assert "| pairs/copy_anchor |" in out
  md = (tmp_path / "report" / "report.md").read_text()
  assert "| pairs/logreg_tfidf+anchor |" in md and "pairs/overall" in md
