"""Reasoning traces: from a teacher endpoint or the policy's own right answers, into SFT.

A trace row is one JSON line `{example_id, trace, decision, model, created}`:
`trace` is the reasoning before the answer and `decision` a clean `DECISION:`
line re-written from the parsed probabilities (3 decimals; it always parses). An answer whose
DECISION line does not parse, or that has no reasoning, becomes no row; it is
counted by reason. Self-generated traces are rejection-sampled: n samples per
example, only those whose decision picks the label, at most m distinct ones.
`augment` turns examples + rows into SFT examples whose completion is the
reasoning and the DECISION line (in the configured order); the loss still covers
only the completion (grain_pipeline). Rows that contradict the label, repeat, name
no known example, are malformed or would not fit seq_len are dropped and counted;
examples with no trace stay as they are. The SFT stage joins them through
`sft_records` (sft.traces, sft.trace_order, and sft.imagined: imagined.py's steps).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
from typing import Callable, Iterable, Sequence

import jax
import numpy as np

from data_pipeline import grain_pipeline
from data_pipeline import io
from data_pipeline.build_report import BuildReport
from data_pipeline.example import Example, ExampleError
from deepimagine_jax import rewards
from deepimagine_jax import sampler
from deepimagine_jax import sharding
from deepimagine_jax import teacher
from deepimagine_jax.config import RunConfig, SFTConfig
from deepimagine_jax.serve_config import TeacherConfig, TracesConfig, typed

FIELDS = {"example_id": str, "trace": str, "decision": str, "model": str, "created": int}
SOURCE = "traces"  # report source of trace rows
JOIN = "trace_join"  # report source of examples that got no trace
IMAGINED = "imagined"  # report source of imagined_step examples read for SFT
TRACES_REPORT = "sft_traces.json"  # under the SFT stage's workdir


@dataclasses.dataclass(frozen=True)
class Trace:
  reasoning: str
  decision: str  # "DECISION: (0.2, 0.8)"
  choice: int


def split_answer(text: str, n_options: int) -> Trace | str:
  """The reasoning and decision of an answer, or the reason it is not a trace."""
  d = rewards.parse_decision(text, n_options)
  if not d.ok:
    return d.error_code
  line_start = text.rfind("\n", 0, text.rfind(rewards.DECISION_TAG)) + 1
  reasoning = text[:line_start].strip()
  if not reasoning:
    return "no_reasoning"
  if rewards.DECISION_TAG in reasoning:
    return "several_decisions"
  # Probabilities to 3 decimals: the parser's 1e-12 floor reads back as 0.
  return Trace(reasoning, "DECISION: (" + ", ".join(f"{round(p, 3):g}" for p in d.probs) + ")",
               d.choice)


def row(example_id: str, trace: Trace, model: str, created: int) -> dict:
  return {"example_id": example_id, "trace": trace.reasoning, "decision": trace.decision,
          "model": model, "created": int(created)}


def keep_right(answers: Sequence[str], label: int, n_options: int, keep: int,
               counts: collections.Counter) -> list[Trace]:
  """Rejection sampling: the first `keep` distinct answers whose decision is the label."""
  kept = []
  for text in answers:
    t = split_answer(text, n_options)
    counts["samples"] += 1
    if isinstance(t, str):
      counts[f"unparsed:{t}"] += 1
      continue
    if t.choice != label:
      counts["wrong"] += 1
      continue
    counts["right"] += 1
    if len(kept) < keep and t not in kept:
      kept.append(t)
  return kept


def teacher_traces(cfg: TeacherConfig, examples: Sequence[Example], cache_path: str, *,
                   progress: bool = True) -> tuple[list[dict], dict]:
  """Asks the endpoint for every example (cached answers are not sent); rows and counts."""
  suffix = "\n" + cfg.instruction if cfg.instruction else ""
  messages = [[{"role": "user", "content": ex.prompt + suffix}] for ex in examples]
  answers, counts = teacher.ask_all(cfg, messages, cache_path, progress=progress)
  rows, reasons = [], collections.Counter()
  for ex, a in zip(examples, answers):
    t = "no_answer" if a is None else split_answer(a.content, ex.n_options)
    if isinstance(t, str):
      reasons[t] += 1
    else:
      rows.append(row(ex.id, t, a.model, a.created))
  return rows, {**counts, "traces": len(rows), "no_trace": dict(reasons)}


def self_traces(graphdef, params, tokenizer, examples: Sequence[Example], cfg: TracesConfig, *,
                prompt_len: int, model_name: str, seed: int) -> tuple[list[dict], dict]:
  """Rejection sampling with the on-device sampler: cfg.self_samples per example, kept right.

  Prompts are padded to one [self_batch, prompt_len] shape (filler rows of padding
  complete the last batch), so the sampler compiles once. A prompt longer than
  prompt_len is skipped and counted, never cut.
  """
  counts = collections.Counter()
  fits = []
  for ex in examples:
    if 1 + len(tokenizer.encode(ex.prompt)) > prompt_len:
      counts["prompt_too_long"] += 1
    else:
      fits.append(ex)
  rows, key, created = [], jax.random.key(seed), int(time.time())
  G, Q = cfg.self_samples, cfg.self_batch
  for start in range(0, len(fits), Q):
    batch = fits[start:start + Q]
    prompt_QP = np.full((Q, prompt_len), tokenizer.pad_id, np.int32)
    mask_QP = np.zeros((Q, prompt_len), np.int32)
    for q, ex in enumerate(batch):
      p = grain_pipeline.rl_prompt(ex, tokenizer, prompt_len)
      prompt_QP[q], mask_QP[q] = p["prompt_tokens"], p["prompt_mask"]
    out = sampler.sample(graphdef, params, prompt_QP, mask_QP, jax.random.fold_in(key, start),
                         max_new_tokens=cfg.self_max_new_tokens,
                         temperature=cfg.self_temperature, eos_id=tokenizer.eos_id,
                         pad_id=tokenizer.pad_id, group_size=G)
    tokens_BC, lengths_B = jax.device_get((out.tokens, out.lengths))
    for q, ex in enumerate(batch):
      texts = [tokenizer.decode([t for t in tokens_BC[b, :lengths_B[b]] if t != tokenizer.eos_id])
               for b in range(q * G, q * G + G)]
      kept = keep_right(texts, ex.label, ex.n_options, cfg.self_keep, counts)
      counts["examples_with_trace"] += bool(kept)
      rows.extend(row(ex.id, t, model_name, created) for t in kept)
  return rows, {"examples": len(examples), "traces": len(rows), **counts}


def imagined_examples(paths: Sequence[str], known_ids: set, report: BuildReport
                      ) -> list[Example]:
  """The imagined_step Examples of `paths` (imagined.py); a line that is not an Example, an
  id already taken or a record outside the train split is counted under "imagined"."""
  out = []
  for path in paths:
    for r in io.read_jsonl(path, report, IMAGINED):
      try:
        ex = Example.from_json(r)
      except ExampleError as e:
        report.add_skip(IMAGINED, "malformed", str(e)[:80])
        continue
      reason = ("not_train" if ex.split != "train" else "duplicate" if ex.id in known_ids
                else "")
      if reason:
        report.add_skip(IMAGINED, reason, ex.id)
        continue
      known_ids.add(ex.id)
      report.add_read(IMAGINED)
      out.append(ex)
  return out


def sft_records(cfg: SFTConfig, records: Sequence[Example], tokenizer, seq_len: int,
                workdir: str) -> list[Example]:
  """The SFT stage's examples: the build's, the imagined steps of `sft.imagined`, each
  with the traces of `sft.traces` joined in (`augment`, in `sft.trace_order`). A trace
  too long for seq_len is dropped and counted (the example stays untraced), never cut.
  The counts are logged and written to <workdir>/sft_traces.json."""
  if not cfg.traces and not cfg.imagined:
    return list(records)
  report = BuildReport()
  records = list(records) + imagined_examples(cfg.imagined, {ex.id for ex in records}, report)

  def fits(ex: Example) -> bool:
    head, body = tokenizer.prompt_ids(ex.prompt)
    return len(head) + len(body) + len(tokenizer.completion_ids(ex.completion)) <= seq_len + 1

  rows = [r for path in cfg.traces for r in io.read_jsonl(path, report, SOURCE)]
  out = augment(records, rows, cfg.trace_order, report, fits=fits)
  io.write_json(os.path.join(workdir, TRACES_REPORT), report.to_dict())
  logging.info("SFT examples with traces (%s, %s): %d; counts %s", ", ".join(cfg.traces),
               ", ".join(cfg.imagined), len(out), json.dumps(report.to_dict()))
  return out


def rows_by_example(paths: Sequence[str], report: BuildReport) -> dict[str, list[dict]]:
  """The well-formed trace rows of `paths` by example id (the eval report shows them beside
  the answers); a bad line or malformed row is counted under "traces"."""
  out = collections.defaultdict(list)
  for path in paths:
    for r in io.read_jsonl(path, report, SOURCE):
      if _problem(r):
        report.add_skip(SOURCE, _problem(r), f"{path}")
        continue
      report.add_read(SOURCE)
      out[r["example_id"]].append(r)
  return dict(out)


def _problem(r) -> str:
  if not isinstance(r, dict) or set(r) != set(FIELDS):
    return "malformed"
  if any(not isinstance(r[k], t) or isinstance(r[k], bool) for k, t in FIELDS.items()):
    return "malformed"
  return ""


def augment(examples: Iterable[Example], rows: Iterable, order: str, report: BuildReport,
            *, fits: Callable[[Example], bool] | None = None) -> list[Example]:
  """SFT examples: each trace of an example becomes a copy whose completion is the reasoning
  and the DECISION line (`order`: reasoning_first | decision_first); an example without
  one stays as it is, counted under "trace_join"/no_trace. Dropped rows are counted under
  "traces" by reason (malformed, unknown_example, bad_decision:<code>, contradicts_label,
  duplicate, too_long: a traced copy `fits` refuses); used rows are its "traces" reads."""
  examples = list(examples)
  by_id = {ex.id: ex for ex in examples}
  traced = collections.defaultdict(list)
  for r in rows:
    reason = _problem(r)
    ex = by_id.get(r["example_id"]) if not reason else None
    if not reason and ex is None:
      reason = "unknown_example"
    if not reason:
      t = split_answer(r["trace"] + "\n" + r["decision"], ex.n_options)
      reason = (f"bad_decision:{t}" if isinstance(t, str) else
                "contradicts_label" if t.choice != ex.label else
                "duplicate" if any(t == u for u, _ in traced[ex.id]) else "")
    if not reason:
      parts = (t.reasoning, t.decision) if order == "reasoning_first" else (t.decision,
                                                                            t.reasoning)
      copy = ex.replace(id=f"{ex.id}#trace{len(traced[ex.id])}", completion="\n".join(parts))
      reason = "too_long" if fits is not None and not fits(copy) else ""
    if reason:
      report.add_skip(SOURCE, reason, r["example_id"] if isinstance(r, dict) and
                      isinstance(r.get("example_id"), str) else "")
      continue
    report.add_read(SOURCE)
    traced[ex.id].append((t, copy))
  out = []
  for ex in examples:
    out.extend(copy for _, copy in traced[ex.id])
    if not traced[ex.id]:
      report.add_skip(JOIN, "no_trace", ex.id)  # counted; the example stays as it is
      out.append(ex)
  return out


def traces(config, workdir: str):
  """The traces job: writes <traces.path> from the teacher endpoint or the run's own policy;
  with an `imagine` section (configs/traces.py:imagine), the teacher's imagined steps."""
  from deepimagine_jax import imagined, jobs  # they import this module: imported at call time
  if "imagine" in config:
    imagined.imagine_job(config, workdir)
    return
  run = RunConfig.from_config(config)
  cfg = typed(TracesConfig, config.traces)
  built, tokenizer = jobs.prepare_data(run, workdir)
  examples = [ex for split in cfg.splits for ex in built.examples(split, cfg.kinds)]
  if cfg.max_examples:
    examples = examples[:cfg.max_examples]
  if not examples:
    raise ValueError(f"traces.splits / traces.kinds: no examples of kinds {cfg.kinds} in "
                     f"{cfg.splits}")
  if cfg.source == "teacher":
    rows, counts = teacher_traces(typed(TeacherConfig, config.teacher), examples,
                                  os.path.join(workdir, "teacher_cache.jsonl"))
  else:
    if not cfg.self_checkpoint:
      raise ValueError("traces.self_checkpoint: name the run whose policy samples")
    mesh = sharding.mesh_from_config(run.mesh)
    graphdef, params, tokenizer = jobs.load_policy(cfg.self_checkpoint, mesh, run.model.dtype)
    with jax.set_mesh(mesh):
      rows, counts = self_traces(graphdef, params, tokenizer, examples, cfg,
                                 prompt_len=run.data.prompt_len,
                                 model_name=f"self:{cfg.self_checkpoint}", seed=run.seed)
  path = cfg.path or os.path.join(workdir, "traces.jsonl")
  io.write_jsonl(path, rows)
  io.write_json(path + ".counts.json", counts)
  logging.info("%d traces written to %s", len(rows), path)
  print(json.dumps(counts, indent=1))
