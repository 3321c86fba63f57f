"""The run report: metrics.json, report.md, PNG plots and a browsable trajectories.html.

Plots use matplotlib's object API (`Figure` + the Agg canvas), never pyplot, so
no global backend is switched and nothing needs a display. Every plot file is
always written (with a "no data" note when its inputs are empty) so the set of
files in a report directory does not depend on what the run logged.
"""
from __future__ import annotations

import collections
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
from data_pipeline.build_report import BuildReport
from data_pipeline.example import Example
from deepimagine_jax import metrics_log, traces as traces_lib
from deepimagine_jax.eval import metrics

FILES = ("metrics.json", "report.md", "loss.png", "reward.png",
         "accuracy_per_category.png", "reliability.png", "trajectories.html")
N_BINS = 10
MAX_HTML_TRAJECTORIES = 2000
PAIR_PREFIX = "pairs/"  # result names of the counterfactual-pair evaluation
TRACES_PER_CATEGORY = 3  # report.md: answers shown with their trace, per category


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
  details: dict  # method-specific: run; answered_by, aggregate, walks (imagining); anchor_id

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

  Each cell is "class-balanced accuracy / macro-F1 / cross-entropy [answered/asked]",
  so no score is read without its coverage.
  """
  cols = sorted({k for m in results.values() for k in m if k != "overall"},
                key=metrics.category_order) + ["overall"]
  head = "| model | " + " | ".join(f"{c} (n={_n(results, c)})" for c in cols) + " |"
  lines = ["Cells: class-balanced accuracy / macro-F1 / cross-entropy (nats) "
           "[questions answered / asked].", "", head, "|" + "---|" * (len(cols) + 1)]
  for name, m in results.items():
    cells = [_cell(m[c], digits) if c in m else "-" for c in cols]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _cell(entry: Mapping, digits: int) -> str:
  scores = " / ".join("-" if not math.isfinite(entry[k]) else f"{entry[k]:.{digits}f}"
                      for k in metrics.METRICS)
  answered = entry["answered"]
  answered = f"{answered:g}" if isinstance(answered, float) else str(answered)
  return f"{scores} [{answered}/{entry['asked']}]"


def _n(results: Mapping, col: str):
  """The questions asked in a column (the same for every model scored on them)."""
  for m in results.values():
    if col in m:
      return m[col]["asked"]
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
  fig = Figure(figsize=(w, h), dpi=110)
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


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
  """Trailing mean over up to `window` points (the first points average what exists)."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    return v
  c = np.concatenate([[0.0], np.cumsum(v)])
  i = np.arange(1, v.size + 1)
  lo = np.maximum(i - window, 0)
  return (c[i] - c[lo]) / (i - lo)


def log_name(path: pathlib.Path) -> str:
  """A short legend name for a metrics log: its folder (sft, rl) for metrics.jsonl, else its stem."""
  return path.parent.name if path.stem == "metrics" and path.parent.name else path.stem


def plot_curves(logs: Mapping[str, list], match, title: str, ylabel: str, path: pathlib.Path):
  """One panel per log (SFT and GRPO losses are different quantities), one colour per
  key that satisfies `match`: raw values faint, the moving average (window about
  1/20 of the run, at least 5 points) bold."""
  panels = [(name, rows, sorted({k for r in rows for k in r if k != "step" and match(k)}))
            for name, rows in logs.items()]
  panels = [(n, rows, keys) for n, rows, keys in panels if any(series(rows, k)[0].size
                                                                for k in keys)]
  fig = _new_figure(7.5, 3.2 * max(len(panels), 1))
  if not panels:
    ax = fig.add_subplot()
    _no_data(ax, title.lower())
    ax.set_title(title)
    _save(fig, path)
    return
  for row, (name, rows, keys) in enumerate(panels):
    ax = fig.add_subplot(len(panels), 1, row + 1)
    for i, k in enumerate(keys):
      s, v = series(rows, k)
      if not s.size:
        continue
      window = max(5, s.size // 20)
      ax.plot(s, v, color=f"C{i % 10}", alpha=0.25, lw=0.8)
      ax.plot(s, moving_average(v, window), color=f"C{i % 10}", lw=2.0,
              label=f"{k} (mean of {window})")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(f"{title}: {name} (faint: every logged step)")
  fig.subplots_adjust(hspace=0.55)
  _save(fig, path)


def _bar_style(name: str) -> dict:
  """References drawn apart from learned results: grey for uniform / majority, hatched copy-anchor."""
  base = name.split("/", 1)[-1]
  if base in ("uniform", "majority"):
    return {"color": "0.75" if base == "uniform" else "0.55", "edgecolor": "black", "lw": 0.5}
  if base == "copy_anchor":
    return {"color": "white", "edgecolor": "black", "hatch": "//", "lw": 0.8}
  return {"edgecolor": "black", "lw": 0.5}


def plot_accuracy(results: Mapping[str, Mapping], path: pathlib.Path):
  """Class-balanced accuracy per category, one panel for questions and one for pairs.

  Bars grouped by category, one per model (reference rules in grey / hatched),
  the value on each bar, answered/asked under each category, legend outside.
  """
  groups = [(title, {n: {k.removeprefix(PAIR_PREFIX): v for k, v in m.items()}
                    for n, m in results.items() if n.startswith(PAIR_PREFIX) == pairs})
            for title, pairs in (("CT Open questions", False), ("Counterfactual pairs", True))]
  groups = [(t, r) for t, r in groups if r] or [("", {})]
  fig = _new_figure(10, 3.6 * len(groups))
  for row, (title, res) in enumerate(groups):
    ax = fig.add_subplot(len(groups), 1, row + 1)
    if not res:
      _no_data(ax, "results")
      continue
    cols = sorted({k for m in res.values() for k in m if k != "overall"},
                  key=metrics.category_order) + ["overall"]
    width = 0.85 / len(res)
    x = np.arange(len(cols))
    for i, (name, m) in enumerate(res.items()):
      vals = np.array([m[c]["balanced_accuracy"] if c in m else np.nan for c in cols])
      xs = x + (i - (len(res) - 1) / 2) * width
      style = _bar_style(name)
      if "color" not in style:
        style["color"] = f"C{i % 10}"
      ax.bar(xs, np.nan_to_num(vals), width, label=name.removeprefix(PAIR_PREFIX), **style)
      for xi, v in zip(xs, vals):
        if np.isfinite(v):
          ax.text(xi, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=6.5, rotation=90)
    ax.axhline(0.5, color="black", lw=0.8, ls="--")
    ax.text(len(cols) - 0.5, 0.5, " chance", va="center", fontsize=8)
    ax.set_xticks(x, [_column_label(res, c) for c in cols], fontsize=8.5)
    ax.set_xlim(-0.5, len(cols) - 0.5)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("class-balanced accuracy")
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
  fig.subplots_adjust(hspace=0.5)
  _save(fig, path)


def _column_label(results: Mapping[str, Mapping], col: str) -> str:
  """Category name over its question count and the fewest any model answered."""
  entries = [m[col] for m in results.values() if col in m]
  least = min(e["answered"] for e in entries)
  least = f"{least:g}" if isinstance(least, float) else least
  return f"{col}\nn={entries[0]['asked']}, answered >= {least}"


def plot_reliability(bins: Mapping, path: pathlib.Path):
  """Accuracy against confidence per bin, each bar labelled with its count, and the
  counts themselves in a panel below (where the decisions are)."""
  fig = _new_figure(5.5, 6.5)
  ax, ax_n = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
  filled = bins["count"] > 0
  if not filled.any():
    _no_data(ax, "decisions")
    _no_data(ax_n, "decisions")
    ax.set_title("Reliability")
    _save(fig, path)
    return
  edges = bins["edges"]
  centers = (edges[:-1] + edges[1:]) / 2
  width = edges[1] - edges[0]
  ax.bar(centers[filled], bins["accuracy"][filled], width=width, edgecolor="black",
         alpha=0.7, label="accuracy in the bin")
  for c, a, n in zip(centers[filled], bins["accuracy"][filled], bins["count"][filled]):
    ax.text(c, 0.01, f"n={n}", ha="center", va="bottom", fontsize=7, rotation=90)
  ax.plot(bins["confidence"][filled], bins["accuracy"][filled], "o", color="C3",
          label="(mean confidence, accuracy)")
  ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.1)
  ax.set_ylabel("accuracy")
  ax.legend(fontsize="small", loc="upper left")
  ax.set_title(f"Reliability ({int(bins['count'].sum())} decisions, ECE {bins['ece']:.3f})")
  ax_n.bar(centers, bins["count"], width=width, edgecolor="black", color="0.6")
  ax_n.set_xlabel("probability of the chosen option")
  ax_n.set_ylabel("decisions")
  _save(fig, path)


_CSS = """
body{font-family:sans-serif;margin:1em;max-width:1100px}
.traj{border:1px solid #ccc;border-radius:4px;margin:.6em 0;padding:.5em}
.traj.ok{border-left:6px solid #2a2} .traj.bad{border-left:6px solid #c22}
pre{white-space:pre-wrap;background:#f6f6f6;padding:.4em;max-height:22em;overflow:auto}
.meta{color:#444;font-size:.9em} details summary{cursor:pointer}
.walk{margin:.4em 0 .4em 1em;padding-left:.5em;border-left:3px solid #88a}
.side{display:flex;gap:.6em} .side>div{flex:1;min-width:0}
table.steps{border-collapse:collapse;font-size:.9em} .steps td,.steps th{border:1px solid #ddd;
padding:.2em .4em;vertical-align:top}
"""

_JS = """
function applyFilters(){
  var c=document.getElementById('f-correct').value;
  var p=document.getElementById('f-pert').value;
  var m=document.getElementById('f-method').value;
  var shown=0;
  document.querySelectorAll('.traj').forEach(function(el){
    var ok=(c==='all'||el.dataset.correct===c)&&(p==='all'||el.dataset.pert===p)
      &&(m==='all'||el.dataset.method===m);
    el.style.display=ok?'':'none'; if(ok)shown++;
  });
  document.getElementById('n-shown').textContent=shown;
}
document.addEventListener('DOMContentLoaded',function(){
  document.getElementById('f-correct').addEventListener('change',applyFilters);
  document.getElementById('f-pert').addEventListener('change',applyFilters);
  document.getElementById('f-method').addEventListener('change',applyFilters);
  applyFilters();
});
"""


def _e(x) -> str:
  return html.escape(str(x), quote=True)


def _probs_text(probs) -> str:
  return "(" + ", ".join(f"{p:.3f}" for p in probs) + ")" if probs is not None else "none"


def _walk_html(w: Mapping) -> str:
  """One anchor's walk: the anchor's observed result, then each step's change, the result
  given, the model's probabilities (none for a per-arm step's generated estimate) and its
  estimate; a per-arm walk ends in its comparison. Step prompts (the target question
  under these lines) stay in the JSON lines: with k walks per answer they would
  multiply the page's size."""
  rows = "".join(
      f'<tr><td>{s["step"] + 1}</td><td>{_e(s["factor"] or "(no known factor differs)")}'
      + (f': {_e(s["from"])} &rarr; {_e(s["to"])}' if s["from"] or s["to"] else "")
      + f'</td><td>{_e(s["given"])}</td><td>{_e(_probs_text(s["probs"]))}</td>'
      f'<td>{_e(s["estimate"])}</td></tr>' for s in w["steps"])
  end = (f'failed: {_e(w["failed"])}' if w["failed"]
         else f'decision {_e(_probs_text(w["probs"]))}')
  sim = w["similarity"]
  return (f'<div class="walk"><div class="meta">anchor {_e(w["anchor_id"])} '
          f'({_e(w["kind"])}, trial {_e(w["anchor_trial_id"])}, similarity '
          f'{_e("?" if sim is None else f"{sim:.3f}")}) &middot; {end}</div>'
          f'<div>Anchor: {_e(w["anchor_title"])} &middot; {_e(w["anchor_endpoint"])}</div>'
          f'<div>Observed: <b>{_e(w["anchor_result"])}</b></div>'
          '<table class="steps"><tr><th>step</th><th>change</th><th>result given</th>'
          f'<th>probs</th><th>estimate</th></tr>{rows}</table></div>')


def _walks_html(t: Trajectory) -> str:
  """Imagining's walks behind one answer, folded (empty for other methods)."""
  if t.method != "imagining":
    return ""
  walks, how = t.details["walks"], t.details["answered_by"]
  summary = (f'{len(walks)} anchor walks, answered by {_e(how)}'
             + (f' ({_e(t.details["aggregate"])} of the decisions)' if how == "anchors" else ""))
  return (f'<details><summary>{summary}</summary>'
          + "".join(_walk_html(w) for w in walks)
          + '<div class="meta">step prompts: eval/trajectories_model_imagining.jsonl</div>'
          '</details>')


def _answer_html(t: Trajectory, traces: Mapping[str, Sequence[Mapping]]) -> str:
  """The answer's text; with the example's traces (teacher or self) beside it."""
  answer = f'<pre>{_e(t.completion)}</pre>'
  rows = traces.get(t.id, ())
  if not rows:
    return answer
  side = "".join(f'<div class="meta">trace by {_e(r["model"])} &middot; {_e(r["decision"])}'
                 f'</div><pre>{_e(r["trace"])}</pre>' for r in rows)
  return (f'<div class="side"><div><div class="meta">answer</div>{answer}</div>'
          f'<div>{side}</div></div>')


def trajectories_html(trajectories: Sequence[Trajectory],
                      limit: int = MAX_HTML_TRAJECTORIES,
                      traces: Mapping[str, Sequence[Mapping]] | None = None) -> str:
  """A self-contained page (inline CSS/JS, no network); every text is HTML-escaped.

  An imagining answer shows each anchor's walk: the observed result, every step
  (change, result given, probabilities, estimate) and the decision. An answer
  whose example has traces (`traces`: example id -> trace rows) shows them beside it.
  """
  traces = traces or {}
  shown = list(trajectories)[:limit]
  perts = sorted({t.perturbation or "none" for t in shown})
  opts = "".join(f'<option value="{_e(p)}">{_e(p)}</option>' for p in perts)
  methods = "".join(f'<option value="{_e(m)}">{_e(m)}</option>'
                    for m in sorted({t.method for t in shown}))
  items = []
  for i, t in enumerate(shown):
    correct = t.correct
    pert = t.perturbation or "none"
    probs_txt = (_probs_text(t.probs) if t.probs is not None
                 else "no answer: no finished anchor walk" if t.method == "imagining"
                 else "unparsed")
    items.append(
        f'<div class="traj {"ok" if correct else "bad"}" data-correct="{str(correct).lower()}" '
        f'data-pert="{_e(pert)}" data-method="{_e(t.method)}"><div class="meta">#{i} &middot; '
        f'{_e(t.method)} &middot; {"correct" if correct else "incorrect"} &middot; '
        f'perturbation: {_e(pert)} &middot; category: {_e(t.category)} &middot; '
        f'label: {_e(t.label)} &middot; probs: {_e(probs_txt)}</div>'
        f'<details><summary>prompt</summary><pre>{_e(t.prompt)}</pre></details>'
        f'{_walks_html(t)}{_answer_html(t, traces)}</div>')
  note = (f" (first {limit} of {len(trajectories)})" if len(trajectories) > limit else "")
  return (
      "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Trajectories</title>"
      f"<style>{_CSS}</style><script>{_JS}</script></head><body>"
      f"<h1>Trajectories{_e(note)}</h1><p>"
      '<label>result <select id="f-correct"><option value="all">all</option>'
      '<option value="true">correct</option><option value="false">incorrect</option>'
      '</select></label> <label>perturbation <select id="f-pert">'
      f'<option value="all">all</option>{opts}</select></label> '
      '<label>method <select id="f-method">'
      f'<option value="all">all</option>{methods}</select></label> '
      '&middot; showing <span id="n-shown"></span></p>'
      + "\n".join(items) + "</body></html>\n")


def traced_examples_md(trajectories: Sequence[Trajectory],
                       traces: Mapping[str, Sequence[Mapping]],
                       per_category: int = TRACES_PER_CATEGORY) -> list[str]:
  """report.md lines: the first `per_category` answers of each category that have a trace,
  the answer's decision beside the trace's (whole, quoted)."""
  shown = collections.defaultdict(list)
  for t in trajectories:
    if t.id in traces and len(shown[t.category]) < per_category:
      shown[t.category].append(t)
  lines = []
  for category in sorted(shown, key=metrics.category_order):
    lines += [f"### {category or '(no category)'}", ""]
    for t in shown[category]:
      lines.append(f"- `{t.id}` ({t.method}, label {t.label + 1}): answer "
                   f"{_probs_text(t.probs)}, {'correct' if t.correct else 'incorrect'}")
      for r in traces[t.id]:
        lines.append(f"  - trace by {r['model']}: {r['decision']}")
        lines.extend("    > " + line for line in r["trace"].split("\n"))
    lines.append("")
  return lines


def write_report(report_dir: str | os.PathLike, results: Mapping[str, Mapping],
                 metrics_logs: Sequence[str | os.PathLike] = (),
                 trajectories: Sequence[Trajectory] = (), *,
                 strict: Mapping[str, Mapping] | None = None,
                 traces_files: Sequence[str | os.PathLike] = ()) -> dict:
  """Writes every file in FILES into report_dir; returns name -> path.

  results: model name -> CT Open metrics dict (the benchmark's table); strict:
  the same names scored by the strict table (shown beside it); metrics_logs:
  JSON-lines training logs (missing files are noted and skipped); trajectories:
  the answers behind the calibration plot and the page; traces_files: trace
  JSON lines (traces.py) shown beside the answers of their examples.
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
    name = log_name(p)
    logs[name if name not in logs else str(p)] = rows
    if skipped:
      notes.append(f"{p}: {skipped} malformed lines skipped")
  plot_curves(logs, lambda k: "loss" in k, "Training loss", "loss", paths["loss.png"])
  plot_curves(logs, lambda k: k.startswith("reward") and not k.endswith("_std"), "Reward",
              "mean reward per rollout", paths["reward.png"])
  plot_accuracy(results, paths["accuracy_per_category.png"])
  conf, corr = _confidences(trajectories)
  bins = reliability_bins(conf, corr)
  plot_reliability(bins, paths["reliability.png"])
  trace_report = BuildReport()
  traces = traces_lib.rows_by_example([str(p) for p in traces_files], trace_report)
  with_trace = sum(t.id in traces for t in trajectories)
  if traces_files:
    skipped = dict(sorted(trace_report.skipped.get(traces_lib.SOURCE, {}).items()))
    notes.append(f"traces: {trace_report.n_read(traces_lib.SOURCE)} rows for {len(traces)} "
                 f"examples from {', '.join(map(str, traces_files))}"
                 + (f" ({skipped} skipped)" if skipped else "")
                 + f"; {with_trace} of {len(trajectories)} answers have one")
  io.atomic_write(paths["trajectories.html"],
                  trajectories_html(trajectories, traces=traces))
  n_traj = len(trajectories)
  summary = {
      "results": results,
      "strict": strict or {},
      "calibration": {"ece": bins["ece"], "n_decisions": int(conf.size),
                      "n_trajectories": n_traj,
                      "bins": {k: bins[k] for k in ("count", "confidence", "accuracy")}},
      "trajectory_accuracy": float(np.mean([t.correct for t in trajectories]))
                             if n_traj else None,
      "notes": notes,
  }
  io.write_json(paths["metrics.json"], summary, indent=2, sort_keys=True)
  md = ["# Run report", "", "## CT Open results", "",
        "Scored by the benchmark's rules (its `evaluations/evaluation.py`): a question "
        "without a parseable answer is not scored, so read every score with its coverage.", "",
        format_table(results) if results else "(no results)", ""]
  if strict:
    md += ["Strict: every question asked; a missing or unparseable answer counts as a wrong "
           "option with p(true) = 0, a tie for the top probability as a wrong choice.", "",
           format_table(strict), ""]
  md += ["![accuracy per category](accuracy_per_category.png)", "",
        "## Training", "", "![loss](loss.png) ![reward](reward.png)", "",
        "## Calibration", "",
        f"{conf.size} parsed decisions out of {n_traj} trajectories; "
        f"expected calibration error {bins['ece']:.4f} ({N_BINS} equal-width bins).", "",
        "![reliability](reliability.png)", "",
        "Browse the examples in [trajectories.html](trajectories.html).", ""]
  if traces_files:
    md += ["## Traces beside decisions", "",
           f"Up to {TRACES_PER_CATEGORY} answers per category whose example has a trace; "
           "every one is on the page.", ""] + traced_examples_md(trajectories, traces)
  if notes:
    md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
  io.atomic_write(paths["report.md"], "\n".join(md))
  return paths
