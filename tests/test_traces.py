"""Traces: answers split into reasoning + decision, rejection sampling, the join into SFT
examples (missing / duplicate / contradicting / malformed rows counted), an SFT step."""
import collections
import dataclasses
import json

import numpy as np
import pytest

import tiny_policy
from configs import common
from data_pipeline import grain_pipeline, templates
from data_pipeline.build_report import BuildReport
from data_pipeline.example import Factor
from deepimagine_jax import imagined, jobs, rewards, sft, sharding, traces, train_state
from deepimagine_jax.eval import report
from deepimagine_jax.config import LoopConfig, ModelConfig, OptimizerConfig, SFTConfig
from deepimagine_jax.serve_config import TracesConfig, typed


def test_split_answer():
  t = traces.split_answer("Higher dose.\nSo higher.\n**DECISION:** (3, 1)", 2)
  assert t == traces.Trace("Higher dose.\nSo higher.", "DECISION: (0.75, 0.25)", 0)
  assert traces.split_answer("DECISION: (0, 1)", 2) == "no_reasoning"
  assert traces.split_answer("why\nDECISION: (0, 1, 0)", 2) == "wrong_count"
  assert traces.split_answer("no answer at all", 3) == "no_decision_line"
  assert traces.split_answer("DECISION: (1, 0)\nthen\nDECISION: (0, 1)", 2) == "several_decisions"
  t = traces.split_answer("a\nDECISION: (1, 1, 1)", 3)
  assert t.decision == "DECISION: (0.333, 0.333, 0.333)" and t.choice == 0


def test_keep_right_keeps_at_most_m_distinct_right_answers():
  answers = ["r1\nDECISION: (0, 1)", "w\nDECISION: (1, 0)", "junk", "r1\nDECISION: (0, 1)",
             "r2\nDECISION: (0.1, 0.9)", "r3\nDECISION: (0, 5)"]
  counts = collections.Counter()
  kept = traces.keep_right(answers, label=1, n_options=2, keep=2, counts=counts)
  assert [t.reasoning for t in kept] == ["r1", "r2"]
  assert counts == {"samples": 6, "right": 4, "wrong": 1, "unparsed:no_decision_line": 1}


def _row(ex_id, trace="because.", decision="DECISION: (0, 1)", **kw):
  return {"example_id": ex_id, "trace": trace, "decision": decision, "model": "m",
          "created": 1, **kw}


def test_augment_joins_and_counts_what_it_drops():
  exs = tiny_policy.examples(4, seed=1)
  a, b, c, d = exs
  right = lambda ex: f"DECISION: ({int(ex.label == 0)}, {int(ex.label == 1)})"
  wrong = lambda ex: f"DECISION: ({int(ex.label == 1)}, {int(ex.label == 0)})"
  rows = [_row(a.id, "A1", right(a)), _row(a.id, "A2", right(a)), _row(a.id, "A1", right(a)),
          _row(b.id, "B", wrong(b)), _row("nope", "X", right(a)), {"example_id": c.id},
          _row(c.id, created="yesterday"), _row(c.id, created=True), _row(c.id, "C", "DECISION: 1"),
          "not a dict", _row(d.id, "D", right(d))]
  report = BuildReport()
  out = traces.augment(exs, rows, "reasoning_first", report)
  assert [e.id for e in out] == [a.id + "#trace0", a.id + "#trace1", b.id, c.id, d.id + "#trace0"]
  assert out[0].completion == "A1\n" + right(a) and out[1].completion == "A2\n" + right(a)
  assert out[2] == b and out[3] == c  # no usable trace: as they were
  assert report.n_read("traces") == 3
  assert report.n_skipped("trace_join", "no_trace") == 2  # b and c
  assert dict(report.skipped["traces"]) == {
      "duplicate": 1, "contradicts_label": 1, "unknown_example": 1, "malformed": 4,
      "bad_decision:" + rewards.parse_decision("C\nDECISION: 1", 2).error_code: 1}
  out = traces.augment(exs, rows[:1], "decision_first", BuildReport())
  assert out[0].completion == right(a) + "\nA1"
  assert rewards.parse_decision(out[0].completion, 2).choice == a.label


def _sft_cfg(**overrides) -> SFTConfig:
  return dataclasses.replace(SFTConfig.from_config(common.sft(steps=2, batch=8)), **overrides)


def test_sft_records_join_files_add_imagined_steps_and_count_what_they_drop(tmp_path):
  a, b, c = tiny_policy.examples(3, seed=1)
  line = lambda ex, why: _row(ex.id, why, templates.decision_line(2, ex.label))
  step = c.replace(id="imagined_step:0:chain:x->y", kind="imagined_step", perturbation="country",
                   completion=templates.decision_line(2, c.label))
  imagined = tmp_path / "imagined.jsonl"
  imagined.write_text("".join(json.dumps(r) + "\n" for r in (
      step.to_json(), step.to_json(), step.replace(id="held out", split="dev").to_json(),
      {**a.to_json(), "label": "one"})) + "{torn\n")
  t1, t2 = tmp_path / "t1.jsonl", tmp_path / "t2.jsonl"
  t1.write_text(json.dumps(line(a, "why")) + "\n{broken\n" + json.dumps(line(b, "w " * 200)) + "\n")
  t2.write_text(json.dumps(line(step, "another region")) + "\n" + json.dumps(_row("gone")) + "\n")
  tok = _tokenizer()
  cfg = _sft_cfg(traces=(str(t1), str(t2)), imagined=(str(imagined),))
  out = traces.sft_records(cfg, [a, b], tok, 96, str(tmp_path))
  assert [e.id for e in out] == [a.id + "#trace0", b.id, step.id + "#trace0"]
  assert out[2].completion == "another region\n" + step.completion
  report = json.loads((tmp_path / traces.TRACES_REPORT).read_text())
  assert report["imagined"]["read"] == 1 and {r: v["count"] for r, v in report["imagined"][
      "skipped"].items()} == {"duplicate": 1, "not_train": 1, "malformed": 1, "bad_json": 1}
  assert report["traces"]["read"] == 2 and {r: v["count"] for r, v in report["traces"][
      "skipped"].items()} == {"bad_json": 1, "too_long": 1, "unknown_example": 1}
  assert report["trace_join"]["skipped"]["no_trace"]["count"] == 1  # b: its trace was too long
  head, body = tok.prompt_ids(b.prompt)  # too long: b's traced sequence is over seq_len
  assert len(head + body + tok.completion_ids("w " * 200 + "\n" + b.completion)) > 97
  assert traces.sft_records(_sft_cfg(), [a, b], tok, 96, str(tmp_path / "none")) == [a, b]


def test_sft_config_refuses_missing_files_and_bad_order(tmp_path):
  with pytest.raises(ValueError, match="sft.traces: no such file"):
    _sft_cfg(traces=(str(tmp_path / "nope.jsonl"),))
  with pytest.raises(ValueError, match="sft.imagined must be a tuple"):
    _sft_cfg(imagined="a.jsonl")
  with pytest.raises(ValueError, match="sft.trace_order"):
    _sft_cfg(trace_order="interleaved")


def test_sft_step_on_traced_examples_trains_on_the_completion_only(tmp_path):
  exs = tiny_policy.examples(32, seed=2)
  rows = [_row(e.id, "the dose moves it.", templates.decision_line(2, e.label)) for e in exs[:16]]
  report = BuildReport()
  traced = traces.augment(exs, rows, "reasoning_first", report)
  assert report.n_read("traces") == 16
  tok = _tokenizer()
  it = grain_pipeline.make_sft_iterator(traced, tok, seq_len=96, global_batch_size=8, seed=0)
  batch = next(it)
  by_prompt = {e.prompt: e.completion for e in traced}
  for row_i in range(8):
    mask = batch["loss_mask"][row_i] > 0
    got = [int(t) for t in batch["targets"][row_i][mask]]
    assert got[-1] == tok.eos_id
    completion = tok.decode(got[:-1])
    first = int(np.argmax(mask))  # the prompt is every input before the first loss position
    prompt = tok.decode([int(t) for t in batch["inputs"][row_i][1:first + 1]])
    assert by_prompt[prompt] == completion
  cfg = ModelConfig.tiny().replace(vocab_size=tok.vocab_size)
  mesh = sharding.make_mesh(-1, 1, 1)
  graphdef, params = train_state.init_params(cfg, mesh, 0)
  opt = OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=2, end_lr_ratio=0.1,
                        weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, grad_clip_norm=1.0,
                        grad_accum_steps=1)
  sft_cfg = SFTConfig(loop=LoopConfig(steps=2, checkpoint_every=100, keep_checkpoints=1,
                                      log_every=1, resume=False),
                      global_batch_size=8, kinds=("synthetic",), optimizer=opt, traces=(),
                      trace_order="reasoning_first", imagined=())
  it = grain_pipeline.make_sft_iterator(traced, tok, seq_len=96, global_batch_size=8, seed=0)
  sft.run_sft(sft_cfg, mesh, graphdef, params, it, str(tmp_path / "sft"), seed=0)
  metrics = [json.loads(line) for line in open(tmp_path / "sft" / "metrics.jsonl")]
  assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)


def _tokenizer():
  mesh = sharding.make_mesh(-1, 1, 1)
  return jobs.load_policy(tiny_policy.run_dir(), mesh, "float32")[2]


def test_self_traces_keep_only_right_decisions():
  mesh = sharding.make_mesh(-1, 1, 1)
  graphdef, params, tok = jobs.load_policy(tiny_policy.run_dir(), mesh, "float32")
  exs = tiny_policy.examples(6, seed=7)
  long = exs[0].replace(id="long", prompt="dose " * 80)
  cfg = dataclasses.replace(typed(TracesConfig, common.traces()), self_samples=4, self_keep=2,
                            self_max_new_tokens=24, self_batch=4)
  rows, counts = traces.self_traces(graphdef, params, tok, exs + [long], cfg, prompt_len=64,
                                    model_name="self:tiny", seed=0)
  assert counts["prompt_too_long"] == 1 and counts["samples"] == 6 * 4
  assert counts["right"] + counts["wrong"] + sum(v for k, v in counts.items()
                                                  if k.startswith("unparsed:")) == 24
  assert 0 < counts["right"] < 24, counts  # a chance-level policy: some right, some wrong
  labels = {e.id: e for e in exs}
  per_example = collections.Counter(r["example_id"] for r in rows)
  assert max(per_example.values()) <= 2 and len(rows) == counts["traces"]
  for r in rows:
    ex = labels[r["example_id"]]
    assert rewards.parse_decision(r["decision"], ex.n_options).choice == ex.label
    assert r["model"] == "self:tiny"


def test_report_shows_traces_beside_the_answers(tmp_path):
  exs = [e.replace(category=cat) for e, cat in zip(tiny_policy.examples(6, seed=3),
                                                    ["2-way/explicit"] * 5 + ["3-way"])]
  trajs = [report.Trajectory.chosen(e, (0.3, 0.7), "direct") for e in exs]
  rows = [_row(e.id, f"<step> {i}\nso it moves", templates.decision_line(2, e.label))
          for i, e in enumerate(exs[:5])]
  p = tmp_path / "t.jsonl"
  p.write_text("".join(json.dumps(r) + "\n" for r in rows + [_row("elsewhere"), {"x": 1}])
               + "{torn\n")
  paths = report.write_report(tmp_path / "r", {}, trajectories=trajs, traces_files=[str(p)])
  page = paths["trajectories.html"].read_text()
  assert page.count('class="side"') == 5 and "&lt;step&gt; 3\nso it moves" in page
  assert "<step>" not in page  # escaped
  md = paths["report.md"].read_text()
  section = md.split("## Traces beside decisions", 1)[1]
  assert [e.id in section for e in exs] == [True] * 3 + [False] * 3  # 3 per category
  assert "    > <step> 0\n    > so it moves" in section
  notes = json.loads(paths["metrics.json"].read_text())["notes"]
  assert notes == [f"traces: 6 rows for 6 examples from {p} ({{'bad_json': 1, 'malformed': 1}} "
                   "skipped); 5 of 6 answers have one"]
  plain = report.write_report(tmp_path / "plain", {}, trajectories=trajs)
  assert 'class="side"' not in plain["trajectories.html"].read_text()
  assert "Traces beside" not in plain["report.md"].read_text()


def test_imagined_answer_checks_and_walk_length():
  check = imagined.check_answer
  assert check("Older.\n**DECISION:** (0.25, 0.75)", 2) == traces.Trace(
      "Older.", "DECISION: (0.25, 0.75)", 1)
  assert check("a\nDECISION: (0.2, 0.3, 0.5)", 3).choice == 2
  assert check("a\nDECISION: (0.5, 0.5)", 2) == "tie"
  assert check("a\nDECISION: (70, 30)", 2) == "out_of_range"
  assert check("a\nDECISION: (0.7, 0.6)", 2) == "not_a_distribution"
  assert check("a\nDECISION: (0.505, 0.485)", 2).choice == 0  # within SUM_TOLERANCE of 1
  assert check("a\nDECISION: (-0.1, 1.1)", 2) == "negative"  # the parser's own code
  assert check("DECISION: (0.1, 0.9)", 2) == "no_reasoning"
  chain = lambda *fs: tiny_policy.examples(1)[0].replace(
      factors=tuple(Factor(f, "a", "b") for f in fs))
  trial_level = ("population", "country", "phase")
  assert [imagined.walkable(chain(*fs), trial_level) for fs in (
      ("population", "dose"), ("dose", "country"), ("dose", "country", "outcome"),
      ("country",), ("dose", "outcome", "phase"), ("phase", "dose", "outcome"))] == [
          1, 0, 2, 0, 0, 1]
  with pytest.raises(ValueError, match="imagine.splits"):
    imagined.ImagineConfig(factors=trial_level, splits=("eval",), max_walks=0)
  with pytest.raises(ValueError, match="imagine.factors"):
    imagined.ImagineConfig(factors=("weather",), splits=("train",), max_walks=0)
