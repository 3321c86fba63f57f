"""The teacher client against real HTTP servers on free ports: a deliberately failing
handler (retries, timeouts, no retry on 400, the key header, resume after kill -9)
and the project's own server with the tiny policy (traces, the cache)."""
import asyncio
import collections
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

import tiny_policy
from configs import common
from data_pipeline import templates
from data_pipeline.example import Example, Factor
from deepimagine_jax import imagined, jobs, rewards, serve, sharding, teacher, traces
from deepimagine_jax.serve_config import ServeConfig, TeacherConfig, typed

REPO = pathlib.Path(__file__).resolve().parents[1]


def _cfg(base_url, **overrides) -> TeacherConfig:
  c = typed(TeacherConfig, common.teacher())
  fast = dict(base_url=base_url, api_key_env="", backoff_s=0.01, backoff_max_s=0.05,
              timeout_s=5.0)
  return dataclasses.replace(c, **{**fast, **overrides})


class Script:
  """A chat-completions handler that fails as told, per prompt, then answers."""

  def __init__(self):
    self.plan = {}  # prompt -> list of failures before success: 429, 500, 503, 400, "slow"
    self.attempts = collections.Counter()
    self.headers = []
    self.delay_s = 0.0

  async def chat(self, request):
    body = await request.json()
    prompt = body["messages"][0]["content"]
    n = self.attempts[prompt]
    self.attempts[prompt] += 1
    self.headers.append(request.headers.get("authorization"))
    await asyncio.sleep(self.delay_s)
    plan = self.plan.get(prompt, [])
    failure = plan[n] if n < len(plan) else plan[-1] if plan and plan[-1] == 400 else None
    if failure == "slow":
      await asyncio.sleep(2.0)
    elif failure is not None:
      return JSONResponse({"error": {"message": "scripted"}}, status_code=failure)
    return JSONResponse({"id": "x", "object": "chat.completion", "created": 1700000000 + n,
                         "model": body["model"], "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant",
                                     "content": f"because {prompt}.\nDECISION: (0.2, 0.8)"}}]})

  def app(self):
    return Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])


@pytest.fixture
def script():
  s = Script()
  with serve.ServerThread(s.app()) as server:
    yield s, server.base_url


def _msgs(prompts):
  return [[{"role": "user", "content": p}] for p in prompts]


def test_retries_429_5xx_and_timeouts_then_caches(script, tmp_path):
  s, url = script
  s.plan = {"a": [429, 429], "b": [500, 503, 502], "c": ["slow"], "d": []}
  cfg = _cfg(url, max_attempts=4, timeout_s=0.5)
  answers, counts = teacher.ask_all(cfg, _msgs("abcd"), str(tmp_path / "c.jsonl"), progress=False)
  assert dict(s.attempts) == {"a": 3, "b": 4, "c": 2, "d": 1}
  assert [a.content.split(".")[0] for a in answers] == ["because a", "because b", "because c",
                                                        "because d"]
  assert counts == {"requests": 4, "cached": 0, "sent_ok": 4, "failed": {}, "cache_skipped": {}}
  answers2, counts2 = teacher.ask_all(cfg, _msgs("abcd"), str(tmp_path / "c.jsonl"),
                                      progress=False)
  assert answers2 == answers and counts2["cached"] == 4 and counts2["sent_ok"] == 0
  assert sum(s.attempts.values()) == 10  # the re-run sent nothing


def test_gives_up_after_max_attempts_and_never_retries_400(script, tmp_path):
  s, url = script
  s.plan = {"five": [500] * 10, "bad": [400], "ok": []}
  cfg = _cfg(url, max_attempts=3)
  answers, counts = teacher.ask_all(cfg, _msgs(["five", "bad", "ok"]), str(tmp_path / "c.jsonl"),
                                    progress=False)
  assert dict(s.attempts) == {"five": 3, "bad": 1, "ok": 1}
  assert answers[0] is None and answers[1] is None and answers[2] is not None
  assert counts["failed"] == {"http_500": 1, "http_400": 1} and counts["sent_ok"] == 1
  teacher.ask_all(cfg, _msgs(["five", "bad", "ok"]), str(tmp_path / "c.jsonl"), progress=False)
  assert dict(s.attempts) == {"five": 6, "bad": 2, "ok": 1}  # failures are not cached


def test_key_from_the_environment_is_sent_and_never_stored(script, tmp_path, monkeypatch):
  s, url = script
  monkeypatch.setenv("H8_TEACHER_KEY", "sk-secret-123")
  cfg = dataclasses.replace(_cfg(url), api_key_env="H8_TEACHER_KEY")
  teacher.ask_all(cfg, _msgs(["x"]), str(tmp_path / "c.jsonl"), progress=False)
  assert s.headers == ["Bearer sk-secret-123"]
  assert "sk-secret" not in (tmp_path / "c.jsonl").read_text()
  monkeypatch.delenv("H8_TEACHER_KEY")
  with pytest.raises(ValueError, match="H8_TEACHER_KEY"):
    teacher.ask_all(cfg, _msgs(["y"]), str(tmp_path / "c.jsonl"), progress=False)


def test_cache_key_covers_model_prompt_and_settings():
  cfg = _cfg("http://x/v1")
  base = teacher.cache_key(teacher.request_body(cfg, _msgs(["p"])[0]))
  for change in (dict(model="m2"), dict(temperature=0.1), dict(top_p=0.5), dict(max_tokens=7)):
    assert teacher.cache_key(teacher.request_body(dataclasses.replace(cfg, **change),
                                                  _msgs(["p"])[0])) != base
  assert teacher.cache_key(teacher.request_body(cfg, _msgs(["q"])[0])) != base
  assert teacher.cache_key(teacher.request_body(dataclasses.replace(cfg, base_url="http://y"),
                                                _msgs(["p"])[0])) == base


def test_resume_after_kill_sends_only_what_is_missing(script, tmp_path):
  s, url = script
  s.delay_s = 0.3
  prompts = [f"p{i}" for i in range(8)]
  cache = tmp_path / "c.jsonl"
  code = ("import sys, json, dataclasses; from configs import common; "
          "from deepimagine_jax import teacher; from deepimagine_jax.serve_config import "
          "TeacherConfig, typed; "
          "c = dataclasses.replace(typed(TeacherConfig, common.teacher()), base_url=sys.argv[1], "
          "api_key_env='', max_concurrency=1); "
          "teacher.ask_all(c, [[{'role': 'user', 'content': p}] for p in json.loads(sys.argv[2])], "
          "sys.argv[3], progress=False)")
  proc = subprocess.Popen([sys.executable, "-c", code, url, json.dumps(prompts), str(cache)],
                          cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  deadline = time.monotonic() + 60
  while not (cache.exists() and cache.read_text().count("\n") >= 3):
    assert proc.poll() is None and time.monotonic() < deadline
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  with open(cache, "a") as f:  # as if the kill had torn a line
    f.write('{"key": "torn')
  sent_before = sum(s.attempts.values())
  done = len(teacher.Cache(cache).answers)
  assert 3 <= done < 8
  cfg = dataclasses.replace(_cfg(url), max_concurrency=1)
  answers, counts = teacher.ask_all(cfg, _msgs(prompts), str(cache), progress=False)
  assert all(a is not None for a in answers)
  assert counts["cached"] == done and counts["cache_skipped"] == {"bad_json": 1}
  assert sum(s.attempts.values()) - sent_before == 8 - done  # nothing sent twice
  assert len(teacher.Cache(cache).answers) == 8


def test_traces_from_the_projects_own_server(tmp_path):
  """The tiny policy served on a free port is the teacher: traces written, then cached."""
  mesh = sharding.make_mesh(-1, 1, 1)
  graphdef, params, tok = jobs.load_policy(tiny_policy.run_dir(), mesh, "float32")
  c = common.serve()
  c.prompt_len, c.max_new_tokens = 96, 32
  engine = serve.Engine(graphdef, params, tok, typed(ServeConfig, c), mesh)
  examples = tiny_policy.examples(6, seed=11)
  with serve.ServerThread(serve.make_app(engine)) as server:
    # The declared 120 s timeout: the first answer compiles the sampler, which on a loaded
    # 2-core machine (two xdist workers and more) can take longer than the 5 s of _cfg.
    cfg = _cfg(server.base_url, instruction="", temperature=0.0, max_tokens=32,
               timeout_s=common.teacher().timeout_s)
    rows, counts = traces.teacher_traces(cfg, examples, str(tmp_path / "c.jsonl"), progress=False)
    calls = engine.calls
    rows2, counts2 = traces.teacher_traces(cfg, examples, str(tmp_path / "c.jsonl"),
                                           progress=False)
  assert counts["sent_ok"] == 6 and counts2["cached"] == 6 and engine.calls == calls
  assert rows2 == rows and counts["traces"] + sum(counts["no_trace"].values()) == 6
  assert counts["traces"] >= 4, counts  # the tiny policy writes the format
  for r in rows:
    assert set(r) == {"example_id", "trace", "decision", "model", "created"}
    assert r["trace"] == tiny_policy.REASONING and r["model"] == "deepimagine-policy"
    assert r["decision"] in ("DECISION: (1, 0)", "DECISION: (0, 1)", "DECISION: (0.5, 0.5)")


def _chain(name, factors, kind="chain"):
  """A rendered chain whose anchor and target are named `name` (the handler keys on it)."""
  def q(qid, label):
    return Example(id=qid, source="ctgov_xml", kind="question", trial_id=f"NCT-{qid}",
                   title=f"Trial {name}", endpoint="Pain at 4 weeks", split="train",
                   options=(f"{name} beat placebo.", f"{name} did not beat placebo."), label=label)
  steps = [Factor(f, f"{f} A", f"{f} B") for f in factors]
  pair = Example.pair(q(f"{name}-a", 0), q(f"{name}-t", 1), kind, steps)
  return templates.render(pair).replace(split="train")


class Imaginer:
  """Answers an imagined-step request by its trial name and step, as `plan` says."""

  def __init__(self, plan):
    self.plan = plan  # (name, step) -> answer text
    self.requests = []

  async def chat(self, request):
    body = await request.json()
    prompt = body["messages"][0]["content"]
    self.requests.append(prompt)
    name = prompt.split("Trial: Trial ", 1)[1].split("\n", 1)[0]
    step = prompt.count("\n- ") - 1  # the changes already made, then the new one
    return JSONResponse({"id": "x", "object": "chat.completion", "created": 1700000000,
                         "model": body["model"], "choices": [{"index": 0, "message": {
                             "role": "assistant", "content": self.plan[(name, step)]}}]})

  def app(self):
    return Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])


def test_imagined_steps_validated_counted_per_factor_and_cached(tmp_path):
  c1 = _chain("c1", ("population", "country", "dose"))  # steps 0 and 1 imagined
  c2 = _chain("c2", ("dose", "population"))  # a dose step first: nothing to imagine
  c3 = _chain("c3", ("country", "phase"))  # step 0 imagined, its answer out of range
  c4 = _chain("c4", ("masking", "phase", "country"))  # step 0 a tie: the walk ends there
  c5 = _chain("c5", ("phase",), kind="approximate_pair")  # one step: it lands on the target
  c6 = _chain("c6", ("dose", "country", "phase"))  # dose asked on the way to country
  plan = {("c1", 0): "Older people respond less.\nDECISION: (0.2, 0.8)",
          ("c1", 1): "Another region, same biology.\n**DECISION:** (0.6, 0.4)",
          ("c3", 0): "It helps.\nDECISION: (70, 30)",
          ("c4", 0): "Unclear.\nDECISION: (0.5, 0.5)",
          ("c6", 0): "Twice the dose.\nDECISION: (1, 0)", ("c6", 1): "Hard to say."}
  handler = Imaginer(plan)
  words = lambda text: len(text.split())
  factors = ("population", "condition", "phase", "allocation", "masking", "country")
  with serve.ServerThread(handler.app()) as server:
    cfg = _cfg(server.base_url)
    run = lambda: imagined.imagine(cfg, [c1, c2, c3, c4, c5, c6], factors, str(tmp_path / "c.jsonl"),
                                   n_tokens=words, max_tokens=400, progress=False)
    exs, rows, report = run()
    assert len(handler.requests) == 6
    exs2, rows2, report2 = run()
  assert len(handler.requests) == 6  # the re-run sent nothing
  assert (exs2, rows2) == (exs, rows) and report2["per_factor"] == report["per_factor"]
  assert report2["teacher"]["cached"] == 6 and report2["teacher"]["sent_ok"] == 0
  assert report["per_factor"] == {
      "population": {"asked": 1, "valid": 1, "rejected": {}},
      "country": {"asked": 3, "valid": 1,
                  "rejected": {"out_of_range": 1, "no_decision_line": 1}},
      "masking": {"asked": 1, "valid": 0, "rejected": {"tie": 1}},
      "dose": {"asked": 1, "valid": 1, "rejected": {}}}
  assert report["chains"] == 6 and report["walked"] == 4 and report["examples"] == 3
  # step 1 is asked from the result the teacher chose at step 0 (option 2 of c1)
  step1 = [p for p in handler.requests if "Changes already made" in p]
  c1_step1 = [p for p in step1 if "Trial: Trial c1" in p]  # a round's requests run concurrently
  assert len(step1) == 2 and "Result so far: c1 did not beat placebo." in c1_step1[0]
  e0, e_dose, e1 = exs
  assert (e_dose.perturbation, e_dose.label) == ("dose", 0)
  assert (e0.id, e0.kind, e0.perturbation, e0.label) == (
      "imagined_step:0:" + c1.id, "imagined_step", "population", 1)
  assert (e1.perturbation, e1.label, e1.split) == ("country", 0, "train")
  assert e0.prompt == templates.render_chain_step(c1, 0, "c1 beat placebo.")[0]
  assert e1.prompt == templates.render_chain_step(c1, 1, "c1 did not beat placebo.")[0]
  assert (e0.completion, e1.completion) == ("DECISION: (0.2, 0.8)", "DECISION: (0.6, 0.4)")
  assert [r["example_id"] for r in rows] == [e0.id, e_dose.id, e1.id]
  assert rows[2]["trace"] == "Another region, same biology." and rows[2]["model"] == cfg.model
  for ex in exs:  # the decisions read back, by the benchmark's parser, as the labels
    assert rewards.parse_decision(ex.completion, ex.n_options).choice == ex.label
