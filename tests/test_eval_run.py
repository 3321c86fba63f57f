"""The evaluation entry: baselines + model + imagining on real CT Open, files that score back."""
import json

import ml_collections
import numpy as np
import pytest
from flax import nnx

from data_pipeline import ct_open, pairs, templates
from data_pipeline.build_report import BuildReport
from deepimagine_jax import model as M
from deepimagine_jax.config import ModelConfig
from deepimagine_jax.eval import ct_open_metrics, predictions, report, run
from deepimagine_jax.tokenizer import Tokenizer

PROMPT_LEN = 128
N_EVAL = 30
N_MODEL = 4


@pytest.fixture(scope="module")
def built(data_root):
  summer = ct_open.read_questions(data_root / "ct_open" / "Summer_2025.pickle", BuildReport(),
                                  split="eval")[:N_EVAL]
  winter = ct_open.read_questions(data_root / "ct_open" / "Winter_2025.pickle", BuildReport(),
                                  split="train")
  target = templates.render(dict(summer[0]))  # model_subset always keeps the first
  anchors = [q for q in winter if len(q["options"]) == len(target["options"])][:2]
  steps = [{"factor": "dose", "anchor_value": "10 mg", "target_value": "20 mg"}]
  chains = [pairs.make_pair(a, target, "chain", steps) for a in anchors]
  # an anchor from the eval release must never be used, even outside max_questions
  chains.append(pairs.make_pair(summer[-1], target, "chain", steps))
  return {"train": winter + chains, "eval": summer}


@pytest.fixture(scope="module")
def policy(built, tmp_path_factory):
  texts = [templates.render(dict(q))["prompt"] for q in built["eval"]]
  texts += [templates.decision_line(n, i) for n in (2, 3) for i in range(n)]
  tok = Tokenizer.train(texts, tmp_path_factory.mktemp("tok"), vocab_size=400)
  cfg = ModelConfig.tiny().replace(vocab_size=tok.vocab_size, tie_embeddings=False)
  graphdef, params = nnx.split(M.Transformer(cfg, nnx.Rngs(0)))
  return tok, graphdef, params


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(
      mode="score", runs=2, temperature=1.0, max_new_tokens=8, batch_size=8,
      max_questions=N_MODEL, imagining=True, imagining_k=2, aggregate="mean", baselines=True,
      rf_seeds="0", checkpoint=""))
  c.update(kw)
  return c


def _same(a, b):
  for cat in a:
    for m in ct_open_metrics.METRICS:
      assert a[cat][m] == pytest.approx(b[cat][m]), (cat, m)


def test_evaluate_score_mode(policy, built, tmp_path):
  tok, graphdef, params = policy
  results = run.evaluate(graphdef, params, tok, built, _cfg(), prompt_len=PROMPT_LEN,
                         workdir=tmp_path, metrics_logs=[tmp_path / "missing.jsonl"])
  assert set(results) == {"uniform", "majority", "logreg_tfidf", "random_forest_tfidf",
                          "model_score", "model_imagining"}
  assert results["uniform"]["overall"]["n"] == N_EVAL  # baselines: all eval questions
  assert results["model_score"]["overall"]["n"] == N_MODEL
  subset = run.model_subset(run.eval_questions(built), N_MODEL)
  for name in ("model_score", "model_imagining"):
    for suffix in (".pkl", ".jsonl"):
      preds = predictions.read_predictions(tmp_path / "eval" / f"predictions_{name}_run0{suffix}")
      assert len(preds) == N_MODEL
      rescored = predictions.score_predictions(subset, [preds])
      _same(results[name], rescored)
      assert rescored["overall"]["failures"] == {"missing": 0}
  stats = results["model_imagining"]["overall"]["imagining"]
  assert stats["imagined"] == 1 and stats["fallback"] == N_MODEL - 1 and stats["chains"] == 2
  assert stats["skipped"]["anchor_is_target"] == 1
  steps = (tmp_path / "eval" / "trajectories_model_imagining.jsonl").read_text().splitlines()
  assert len(steps) == 2 and json.loads(steps[0])["method"] == "imagining"
  for f in report.FILES:
    assert (tmp_path / "report" / f).is_file(), f
  summary = json.loads((tmp_path / "report" / "metrics.json").read_text())
  assert summary["calibration"]["n_trajectories"] == 2 * N_MODEL
  assert json.loads((tmp_path / "eval" / "results.json").read_text())["imagining"]["imagined"] == 1


def test_evaluate_sample_mode_runs(policy, built, tmp_path):
  tok, graphdef, params = policy
  results = run.evaluate(graphdef, params, tok, built,
                         _cfg(mode="sample", baselines=False, imagining=False),
                         prompt_len=PROMPT_LEN, workdir=tmp_path)
  assert set(results) == {"model_sample"}
  subset = run.model_subset(run.eval_questions(built), N_MODEL)
  runs = [predictions.read_predictions(tmp_path / "eval" / f"predictions_model_sample_run{r}.pkl")
          for r in range(2)]
  _same(results["model_sample"], predictions.score_predictions(subset, runs))
  assert results["model_sample"]["overall"]["runs"] == 2


def test_model_subset_spreads():
  qs = [{"id": str(i)} for i in range(10)]
  assert [q["id"] for q in run.model_subset(qs, 4)] == ["0", "3", "6", "9"]
  assert run.model_subset(qs, 0) == qs and run.model_subset(qs, 50) == qs


def test_evaluate_baselines_only(built, tmp_path, capsys):
  results = run.evaluate(None, None, None, built, _cfg(max_questions=0), prompt_len=PROMPT_LEN,
                         workdir=tmp_path)
  assert set(results) == {"uniform", "majority", "logreg_tfidf", "random_forest_tfidf"}
  assert "| uniform |" in capsys.readouterr().out
  assert not list((tmp_path / "eval").glob("predictions_*"))
  np.testing.assert_allclose(results["uniform"]["overall"]["n"], N_EVAL)
  with pytest.raises(ValueError, match="eval"):
    run.evaluate(None, None, None, {"train": built["train"]}, _cfg(), prompt_len=PROMPT_LEN,
                 workdir=tmp_path)
