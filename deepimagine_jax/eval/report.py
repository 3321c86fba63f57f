"""The run report: metrics.json, report.md, PNG plots and a browsable trajectories.html.

Plots use matplotlib's object API (`Figure` + the Agg canvas), never pyplot, so
no global backend is switched and nothing needs a display. Every plot file is
always written (with a "no data" note when its inputs are empty) so the set of
files in a report directory does not depend on what the run logged.
"""
from __future__ import annotations

import copy
import dataclasses
import html
import math
import os
import pathlib
from io import BytesIO
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from data_pipeline import io, templates
from data_pipeline.example import Example
from deepimagine_jax import metrics_log
from deepimagine_jax.eval import metrics

FILES = ("metrics.json", "report.md", "loss.png", "reward.png",
         "accuracy_per_category.png", "reliability.png", "trajectories.html")
N_BINS = 10
MAX_HTML_TRAJECTORIES = 2000
PAIR_PREFIX = "pairs/"  # result names of the counterfactual-pair evaluation


@dataclasses.dataclass(frozen=True)
class Trajectory:
  """One answer as the report shows it: the prompt, the completion, how it scored."""
  id: str
  prompt: str
  completion: str
  probs: tuple[float, ...] | None  # None: the completion did not parse
  label: int
  correct: bool
  perturbation: str
  category: str
  method: str  # direct | imagining | pair_score
  details: dict  # method-specific: run; chain_id, step, n_steps, final, ...; anchor_id

  @classmethod
  def of(cls, ex: Example, completion: str, probs, method: str, **details) -> Trajectory:
    """The answer `completion` to `ex`, whose option probabilities are `probs` (or None)."""
    p = None if probs is None else tuple(float(x) for x in probs)
    return cls(id=ex.id, prompt=ex.prompt, completion=completion, probs=p, label=ex.label,
               correct=p is not None and metrics.choose(p) == ex.label,
               perturbation=ex.perturbation, category=ex.category, method=method,
               details=details)

  @classmethod
  def chosen(cls, ex: Example, probs, method: str, **details) -> Trajectory:
    """An answer given as probabilities: the completion is the DECISION line of its choice."""
    line = templates.decision_line(len(probs), metrics.choose(probs))
    return cls.of(ex, line, probs, method, **details)

  def to_json(self) -> dict:
    """A flat JSON row: the fields, then the details."""
    row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "details"}
    return {**row, **self.details}


def read_metrics_log(path: str | os.PathLike) -> tuple[list[dict], int]:
  """(metrics_log.read_metrics rows, the number of non-blank lines it skipped)."""
  rows = metrics_log.read_metrics(path)
  with open(path, encoding="utf-8") as f:
    lines = sum(1 for line in f if line.strip())
  return rows, lines - len(rows)


def format_table(results: Mapping[str, Mapping], digits: int = 3) -> str:
  """Markdown table: one row per model, one column per category and overall.

  Each cell is "class-balanced accuracy / macro-F1 / cross-entropy".
  """
  cols = sorted({k for m in results.values() for k in m if k != "overall"},
                key=metrics.category_order) + ["overall"]
  head = "| model | " + " | ".join(
      f"{c} (n={_n(results, c)})" for c in cols) + " |"
  lines = ["Cells: class-balanced accuracy / macro-F1 / cross-entropy (nats).", "",
           head, "|" + "---|" * (len(cols) + 1)]
  for name, m in results.items():
    cells = []
    for c in cols:
      if c in m:
        cells.append(" / ".join(f"{m[c][k]:.{digits}f}" for k in metrics.METRICS))
      else:
        cells.append("-")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _n(results: Mapping, col: str):
  for m in results.values():
    if col in m:
      return m[col].get("n", "?")
  return "?"


def pairs_apart(results: Mapping[str, Mapping]) -> dict:
  """Results for the report's single table: pair categories get their own columns.

  Pairs and questions share category names but not counts, so a shared column
  would show one n for both; "pairs/<category>" keeps them apart.
  """
  out = {}
  for name, m in results.items():
    if name.startswith(PAIR_PREFIX):
      m = {PAIR_PREFIX + k: v for k, v in m.items()}
    out[name] = copy.deepcopy(dict(m))
  return out


def series(rows: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of one numeric key, finite values only, sorted by step."""
  pts = sorted((r["step"], float(r[key])) for r in rows
               if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
               and math.isfinite(float(r[key])))
  if not pts:
    return np.zeros(0), np.zeros(0)
  s, v = zip(*pts)
  return np.asarray(s), np.asarray(v)


def reliability_bins(confidence: Sequence[float], correct: Sequence[bool],
                     n_bins: int = N_BINS) -> dict:
  """Equal-width bins over [0, 1] of the chosen option's probability.

  Bin i holds confidences in [i/n, (i+1)/n), the last bin also holds 1.0.
  Returns per-bin count, mean confidence and accuracy (NaN for empty bins) and
  the expected calibration error ECE = sum_i (n_i / N) |acc_i - conf_i|.
  """
  conf = np.asarray(confidence, dtype=np.float64)
  corr = np.asarray(correct, dtype=np.float64)
  if conf.shape != corr.shape:
    raise ValueError(f"{conf.size} confidences for {corr.size} correctness flags")
  idx = np.clip(np.floor(conf * n_bins).astype(np.int64), 0, n_bins - 1)
  count = np.bincount(idx, minlength=n_bins).astype(np.int64)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
    acc = np.bincount(idx, weights=corr, minlength=n_bins) / count
  filled = count > 0
  ece = float(np.sum(count[filled] / max(conf.size, 1)
                     * np.abs(acc[filled] - mean_conf[filled]))) if conf.size else float("nan")
  return {"edges": np.linspace(0, 1, n_bins + 1), "count": count,
          "confidence": mean_conf, "accuracy": acc, "ece": ece}


def _confidences(trajectories: Sequence[Trajectory]) -> tuple[np.ndarray, np.ndarray]:
  """Chosen-option probability and correctness of trajectories that parsed."""
  conf, corr = [], []
  for t in trajectories:
    if not t.probs:
      continue
    conf.append(max(t.probs))
    corr.append(t.correct)
  return np.asarray(conf), np.asarray(corr)


def _new_figure(w=6.4, h=4.0) -> Figure:
  fig = Figure(figsize=(w, h), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path: pathlib.Path):
  buf = BytesIO()
  fig.savefig(buf, format="png", bbox_inches="tight")
  io.atomic_write(path, buf.getvalue())


def _no_data(ax, what: str):
  ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=ax.transAxes)
  ax.set_xticks([])
  ax.set_yticks([])


def plot_curves(logs: Mapping[str, list], match, title: str, path: pathlib.Path):
  """One line per (log, key) whose key satisfies `match`, against step."""
  fig = _new_figure()
  ax = fig.add_subplot()
  drawn = 0
  for name, rows in logs.items():
    keys = sorted({k for r in rows for k in r if k != "step" and match(k)})
    for k in keys:
      s, v = series(rows, k)
      if s.size:
        ax.plot(s, v, label=f"{name}: {k}" if len(logs) > 1 else k)
        drawn += 1
  if drawn:
    ax.set_xlabel("step")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
  else:
    _no_data(ax, title.lower())
  ax.set_title(title)
  _save(fig, path)


def plot_accuracy(results: Mapping[str, Mapping], path: pathlib.Path):
  """Grouped bars: class-balanced accuracy per category (and overall), one bar per model."""
  fig = _new_figure(8, 4)
  ax = fig.add_subplot()
  cols = sorted({k for m in results.values() for k in m if k != "overall"},
                key=metrics.category_order) + ["overall"]
  if not results:
    _no_data(ax, "results")
  else:
    width = 0.8 / len(results)
    x = np.arange(len(cols))
    for i, (name, m) in enumerate(results.items()):
      vals = [m[c]["balanced_accuracy"] if c in m else np.nan for c in cols]
      ax.bar(x + (i - (len(results) - 1) / 2) * width, vals, width, label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, cols)
    ax.set_ylim(0, 1)
    ax.set_ylabel("class-balanced accuracy")
    ax.legend(fontsize="small")
  ax.set_title("Accuracy per category")
  _save(fig, path)


def plot_reliability(bins: Mapping, path: pathlib.Path):
  fig = _new_figure(5, 5)
  ax = fig.add_subplot()
  filled = bins["count"] > 0
  if not filled.any():
    _no_data(ax, "decisions")
  else:
    edges = bins["edges"]
    centers = (edges[:-1] + edges[1:]) / 2
    ax.bar(centers[filled], bins["accuracy"][filled], width=edges[1] - edges[0],
           edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot(bins["confidence"][filled], bins["accuracy"][filled], "o", color="C3",
            label="(mean confidence, accuracy)")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("probability of the chosen option")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize="small", loc="upper left")
  ax.set_title(f"Reliability (ECE {bins['ece']:.3f})" if filled.any() else "Reliability")
  _save(fig, path)


_CSS = """
body{font-family:sans-serif;margin:1em;max-width:1100px}
.traj{border:1px solid #ccc;border-radius:4px;margin:.6em 0;padding:.5em}
.traj.ok{border-left:6px solid #2a2} .traj.bad{border-left:6px solid #c22}
pre{white-space:pre-wrap;background:#f6f6f6;padding:.4em;max-height:22em;overflow:auto}
.meta{color:#444;font-size:.9em} details summary{cursor:pointer}
"""

_JS = """
function applyFilters(){
  var c=document.getElementById('f-correct').value;
  var p=document.getElementById('f-pert').value;
  var shown=0;
  document.querySelectorAll('.traj').forEach(function(el){
    var ok=(c==='all'||el.dataset.correct===c)&&(p==='all'||el.dataset.pert===p);
    el.style.display=ok?'':'none'; if(ok)shown++;
  });
  document.getElementById('n-shown').textContent=shown;
}
document.addEventListener('DOMContentLoaded',function(){
  document.getElementById('f-correct').addEventListener('change',applyFilters);
  document.getElementById('f-pert').addEventListener('change',applyFilters);
  applyFilters();
});
"""


def _e(x) -> str:
  return html.escape(str(x), quote=True)


def trajectories_html(trajectories: Sequence[Trajectory],
                      limit: int = MAX_HTML_TRAJECTORIES) -> str:
  """A self-contained page (inline CSS/JS, no network); every text is HTML-escaped."""
  shown = list(trajectories)[:limit]
  perts = sorted({t.perturbation or "none" for t in shown})
  opts = "".join(f'<option value="{_e(p)}">{_e(p)}</option>' for p in perts)
  items = []
  for i, t in enumerate(shown):
    correct = t.correct
    pert = t.perturbation or "none"
    probs_txt = ("unparsed" if t.probs is None
                 else "(" + ", ".join(f"{p:.3f}" for p in t.probs) + ")")
    items.append(
        f'<div class="traj {"ok" if correct else "bad"}" data-correct="{str(correct).lower()}" '
        f'data-pert="{_e(pert)}"><div class="meta">#{i} &middot; '
        f'{"correct" if correct else "incorrect"} &middot; perturbation: {_e(pert)} &middot; '
        f'category: {_e(t.category)} &middot; label: {_e(t.label)} '
        f'&middot; probs: {_e(probs_txt)}</div>'
        f'<details><summary>prompt</summary><pre>{_e(t.prompt)}</pre></details>'
        f'<pre>{_e(t.completion)}</pre></div>')
  note = (f" (first {limit} of {len(trajectories)})" if len(trajectories) > limit else "")
  return (
      "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Trajectories</title>"
      f"<style>{_CSS}</style><script>{_JS}</script></head><body>"
      f"<h1>Trajectories{_e(note)}</h1><p>"
      '<label>result <select id="f-correct"><option value="all">all</option>'
      '<option value="true">correct</option><option value="false">incorrect</option>'
      '</select></label> <label>perturbation <select id="f-pert">'
      f'<option value="all">all</option>{opts}</select></label> '
      '&middot; showing <span id="n-shown"></span></p>'
      + "\n".join(items) + "</body></html>\n")


def write_report(report_dir: str | os.PathLike, results: Mapping[str, Mapping],
                 metrics_logs: Sequence[str | os.PathLike] = (),
                 trajectories: Sequence[Trajectory] = ()) -> dict:
  """Writes every file in FILES into report_dir; returns name -> path.

  results: model name -> CT Open metrics dict (metrics.score / the
  baselines); metrics_logs: JSON-lines training logs (missing files are noted
  and skipped); trajectories: the answers behind the calibration plot and the page.
  """
  out = pathlib.Path(report_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = {name: out / name for name in FILES}
  logs, notes = {}, []
  for p in metrics_logs:
    p = pathlib.Path(p)
    if not p.is_file():
      notes.append(f"metrics log {p} not found")
      continue
    rows, skipped = read_metrics_log(p)
    logs[p.stem if p.stem not in logs else str(p)] = rows
    if skipped:
      notes.append(f"{p}: {skipped} malformed lines skipped")
  plot_curves(logs, lambda k: "loss" in k, "Training loss", paths["loss.png"])
  plot_curves(logs, lambda k: k.startswith("reward"), "Reward", paths["reward.png"])
  plot_accuracy(results, paths["accuracy_per_category.png"])
  conf, corr = _confidences(trajectories)
  bins = reliability_bins(conf, corr)
  plot_reliability(bins, paths["reliability.png"])
  io.atomic_write(paths["trajectories.html"], trajectories_html(trajectories))
  n_traj = len(trajectories)
  summary = {
      "results": results,
      "calibration": {"ece": bins["ece"], "n_decisions": int(conf.size),
                      "n_trajectories": n_traj,
                      "bins": {k: bins[k] for k in ("count", "confidence", "accuracy")}},
      "trajectory_accuracy": float(np.mean([t.correct for t in trajectories]))
                             if n_traj else None,
      "notes": notes,
  }
  io.write_json(paths["metrics.json"], summary, indent=2, sort_keys=True)
  md = ["# Run report", "", "## CT Open results", "",
        format_table(results) if results else "(no results)", "",
        "![accuracy per category](accuracy_per_category.png)", "",
        "## Training", "", "![loss](loss.png) ![reward](reward.png)", "",
        "## Calibration", "",
        f"{conf.size} parsed decisions out of {n_traj} trajectories; "
        f"expected calibration error {bins['ece']:.4f} ({N_BINS} equal-width bins).", "",
        "![reliability](reliability.png)", "",
        "Browse the examples in [trajectories.html](trajectories.html).", ""]
  if notes:
    md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
  io.atomic_write(paths["report.md"], "\n".join(md))
  return paths
