"""Run report: every file written, valid PNGs, escaped HTML, hand-computed calibration."""
import json

import numpy as np
import pytest
from PIL import Image

from data_pipeline.example import Example
from deepimagine_jax.eval import metrics as M
from deepimagine_jax.eval import report as R

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OPTS2 = ["This endpoint is met.", "This endpoint is not met."]


def _results():
  qs = [Example(id=f"q{i}", source="ct_open", kind="question", trial_id="NCT0",
                options=tuple(OPTS2), label=l, category=c)
        for i, (l, c) in enumerate([(0, "2-way/implicit"), (1, "2-way/implicit"),
                                    (0, "2-way/explicit"), (1, "2-way/explicit")])]
  return {"model": M.score_run(qs, [[0.8, 0.2], [0.3, 0.7], None, [0.9, 0.1]]),
          "uniform": M.score_run(qs, [[0.5, 0.5]] * 4),
          "pairs/copy_anchor": M.score_run(qs, [[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.9, 0.1]])}


def _strict_case():
  q = Example(id="q", source="ct_open", kind="question", trial_id="NCT0", options=tuple(OPTS2),
              label=0, category="2-way/explicit")
  return [q], [None]


def test_format_table_prints_coverage_in_every_cell():
  table = R.format_table({"model": _results()["model"]})
  # 2-way/explicit: the one answer (truth 1, p = (.9, .1)) is wrong: recall 0, F1 0, -ln .1
  rows = [l for l in table.splitlines() if l.startswith("| model | 0")]
  assert rows == ["| model | 0.000 / 0.000 / 2.303 [1/2] | 1.000 / 1.000 / 0.290 [2/2] | "
                  "0.500 / 0.500 / 1.296 [3/4] |"]
  assert "(n=2)" in table and "(n=4)" in table


def test_moving_average_and_log_names(tmp_path):
  np.testing.assert_allclose(R.moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2),
                             [1.0, 2.0, 4.0, 6.0])
  assert R.log_name(tmp_path / "sft" / "metrics.jsonl") == "sft"
  assert R.log_name(tmp_path / "rl.jsonl") == "rl"


def _trajectory(prompt, completion, probs, label, correct, perturbation, category):
  return R.Trajectory(id=prompt, prompt=prompt, completion=completion, probs=probs, label=label,
                      correct=correct, perturbation=perturbation, category=category,
                      method="direct", details={})


def _trajectories():
  return [
      _trajectory("Trial <script>alert('x')</script> & co", "DECISION: (0.9, 0.1)", (0.9, 0.1),
                  0, True, "dose", "2-way/explicit"),
      _trajectory("p2", "DECISION: (0.3, 0.7)", (0.3, 0.7), 0, False, "population\"><b>",
                  "2-way/implicit"),
      _trajectory("p3", "no decision", None, 1, False, "", "2-way/implicit"),
  ]


def _log(path, rows):
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
  return path


def test_reliability_bins_hand_computed():
  b = R.reliability_bins([0.55, 0.65, 0.95, 1.0], [1, 0, 1, 1], n_bins=10)
  assert b["count"].tolist() == [0] * 5 + [1, 1, 0, 0, 2]
  assert b["accuracy"][5] == 1.0 and b["accuracy"][6] == 0.0 and b["accuracy"][9] == 1.0
  assert b["confidence"][9] == pytest.approx(0.975)
  assert np.isnan(b["accuracy"][0])
  assert b["ece"] == pytest.approx(0.25 * 0.45 + 0.25 * 0.65 + 0.5 * 0.025)


def test_write_report_files(tmp_path):
  log_a = _log(tmp_path / "sft.jsonl", [{"step": s, "loss": 2.0 / (s + 1)} for s in range(5)])
  log_b = _log(tmp_path / "rl.jsonl", [{"step": s, "loss": 0.1, "reward_mean": s / 10,
                                        "reward_std": 0.1} for s in range(5)])
  out = tmp_path / "report"
  paths = R.write_report(out, R.pairs_apart(_results()),
                         [log_a, log_b, tmp_path / "missing.jsonl"], _trajectories(),
                         strict={"model": M.score_run(*_strict_case(), strict=True)})
  assert sorted(p.name for p in out.iterdir()) == sorted(R.FILES)
  assert set(paths) == set(R.FILES)
  for name in R.FILES:
    if name.endswith(".png"):
      data = (out / name).read_bytes()
      assert data[:8] == PNG_SIGNATURE, name
      with Image.open(out / name) as im:
        im.load()
        assert im.size[0] > 100 and im.size[1] > 100, name

  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["results"]["model"]["overall"]["balanced_accuracy"] == pytest.approx(
      _results()["model"]["overall"]["balanced_accuracy"])
  assert metrics["calibration"]["n_decisions"] == 2
  assert metrics["calibration"]["ece"] == pytest.approx(0.5 * 0.1 + 0.5 * 0.7)
  assert any("missing.jsonl" in n for n in metrics["notes"])
  assert any("malformed" in n for n in metrics["notes"])

  md = (out / "report.md").read_text()
  assert "| model |" in md and "| uniform |" in md and "2-way/implicit" in md
  assert "[1/2]" in md  # the model answered one of two 2-way/explicit questions
  assert "Strict" in md and md.count("| model |") == 4  # two tables: header + row each
  for name in R.FILES[2:]:
    assert name in md

  page = (out / "trajectories.html").read_text()
  assert "<script>alert" not in page and "&lt;script&gt;alert" in page
  assert 'population"><b>' not in page and "population&quot;&gt;&lt;b&gt;" in page
  assert "http://" not in page and "https://" not in page  # self-contained
  assert page.count('class="traj ') == 3
  assert 'data-correct="false"' in page and 'data-pert="dose"' in page


def test_write_report_without_logs_or_trajectories(tmp_path):
  R.write_report(tmp_path, {}, [], [])
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(R.FILES)
  for name in R.FILES:
    if name.endswith(".png"):
      assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert metrics["calibration"]["ece"] is None


def test_read_metrics_log_and_series(tmp_path):
  path = _log(tmp_path / "m.jsonl", [{"step": 2, "loss": 1.0}, {"step": 1, "loss": 3.0},
                                     {"step": 3, "loss": float("nan")}, {"loss": 9.0}])
  rows, skipped = R.read_metrics_log(path)
  assert skipped == 2 and len(rows) == 3
  s, v = R.series(rows, "loss")
  assert s.tolist() == [1.0, 2.0] and v.tolist() == [3.0, 1.0]
