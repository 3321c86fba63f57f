"""The OpenAI-compatible server: request validation, and the real server on a free port
serving the tiny policy, checked against the sampler called directly."""
import concurrent.futures
import json
import pathlib
import socket
import subprocess
import sys
import time

import httpx
import jax
import numpy as np
import pytest

import test_entry
import tiny_policy
from configs import common
from configs import serve as serve_config
from deepimagine_jax import jobs, sampler, serve, sharding
from deepimagine_jax.serve_config import ServeConfig, typed

REPO = pathlib.Path(__file__).resolve().parents[1]


def _cfg(**overrides) -> ServeConfig:
  c = common.serve()
  c.prompt_len, c.max_new_tokens = 96, 32
  c.update(overrides)
  return typed(ServeConfig, c)


def _body(content="hello", **kw):
  return {"model": "deepimagine-policy", "messages": [{"role": "user", "content": content}], **kw}


# Validation, no model -----------------------------------------------------------------

def test_parse_request_defaults_and_joined_messages():
  r = serve.parse_request({"model": "deepimagine-policy", "messages": [
      {"role": "system", "content": "a"},
      {"role": "user", "content": [{"type": "text", "text": "b"}, {"type": "text", "text": "c"}]}]},
      _cfg())
  assert r == serve.ChatRequest(prompt="a\nbc", temperature=1.0, top_p=1.0, max_tokens=32, n=1,
                                stop=(), stream=False)
  r = serve.parse_request(_body(stop="\n", n=2, max_tokens=5, temperature=0, stream=True), _cfg())
  assert (r.stop, r.n, r.max_tokens, r.temperature, r.stream) == (("\n",), 2, 5, 0.0, True)


@pytest.mark.parametrize("body, param, status", [
    (_body(temperature=3), "temperature", 400),
    (_body(temperature=True), "temperature", 400),
    (_body(top_p=0), "top_p", 400),
    (_body(max_tokens=33), "max_tokens", 400),
    (_body(max_tokens=1.5), "max_tokens", 400),
    (_body(n=9), "n", 400),
    (_body(stop=["a", ""]), "stop", 400),
    (_body(stop=["a"] * 5), "stop", 400),
    (_body(stream="yes"), "stream", 400),
    (_body(logprobs=True), "logprobs", 400),
    (_body(model="gpt-4"), "model", 404),
    ({"model": "deepimagine-policy", "messages": []}, "messages", 400),
    ({"model": "deepimagine-policy", "messages": [{"role": "tool", "content": "x"}]},
     "messages[0]", 400),
    ({"model": "deepimagine-policy", "messages": [{"role": "user", "content": 3}]},
     "messages[0].content", 400),
])
def test_parse_request_refuses_with_the_field(body, param, status):
  with pytest.raises(serve.RequestError) as e:
    serve.parse_request(body, _cfg())
  assert (e.value.param, e.value.status) == (param, status)


def test_bucket_and_stop():
  assert [serve.bucket(m, 256) for m in (1, 16, 17, 100, 256)] == [16, 16, 32, 128, 256]
  assert serve.bucket(100, 48) == 48
  assert [serve.row_bucket(r, 8) for r in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
  assert serve.row_bucket(5, 6) == 6
  assert serve.apply_stop("ab\ncd END", ("END", "\n")) == ("ab", True)
  assert serve.apply_stop("abc", ("x",)) == ("abc", False)


# The real server ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def policy():
  mesh = sharding.make_mesh(-1, 1, 1)
  graphdef, params, tok = jobs.load_policy(tiny_policy.run_dir(), mesh, "float32")
  return graphdef, params, tok, mesh


@pytest.fixture(scope="module")
def server(policy):
  graphdef, params, tok, mesh = policy
  engine = serve.Engine(graphdef, params, tok, _cfg(batch_wait_ms=50.0), mesh)
  app = serve.make_app(engine)
  with serve.ServerThread(app) as s:
    yield s, app


def _greedy_reference(policy, prompts: list[str]) -> list[str]:
  """The sampler called directly (one call, its own left padding), no server, no queue."""
  graphdef, params, tok, _ = policy
  rows = [[tok.bos_id] + tok.encode(p) for p in prompts]
  P = max(map(len, rows))
  ids = np.asarray([[tok.pad_id] * (P - len(r)) + r for r in rows], np.int32)
  mask = np.asarray([[0] * (P - len(r)) + [1] * len(r) for r in rows], np.int32)
  out = sampler.sample(graphdef, params, ids, mask, jax.random.key(0), max_new_tokens=32,
                       temperature=0.0, eos_id=tok.eos_id)
  return [tok.decode([int(t) for t in out.tokens[q, :int(out.lengths[q])] if t != tok.eos_id])
          for q in range(len(rows))]


@pytest.fixture(scope="module")
def prompts_and_references(policy):
  prompts = [e.prompt for e in tiny_policy.examples(6, seed=3)]
  return prompts, _greedy_reference(policy, prompts)


def test_models_lists_the_policy(server):
  s, _ = server
  r = httpx.get(s.base_url + "/models")
  assert r.status_code == 200
  assert [m["id"] for m in r.json()["data"]] == ["deepimagine-policy"]


def test_concurrent_greedy_requests_share_calls_and_match_the_sampler(
    server, policy, prompts_and_references):
  s, app = server
  prompts, references = prompts_and_references
  before = len(app.state.batcher.batch_sizes)

  def ask(p):
    return httpx.post(s.base_url + "/chat/completions", timeout=120,
                      json=_body(p, temperature=0, max_tokens=32))

  with concurrent.futures.ThreadPoolExecutor(6) as pool:
    responses = list(pool.map(ask, prompts))
  for p, ref, r in zip(prompts, references, responses):
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["content"] == ref
    assert choice["finish_reason"] == "stop"  # the tiny policy ends with EOS
    assert body["usage"]["prompt_tokens"] == 1 + len(policy[2].encode(p))
  sizes = app.state.batcher.batch_sizes[before:]
  assert sum(sizes) == 6 and max(sizes) > 1, sizes  # requests shared sampler calls


def test_streaming_sends_the_same_text_as_chunks(server, prompts_and_references):
  s, _ = server
  p, ref = prompts_and_references[0][1], prompts_and_references[1][1]
  with httpx.stream("POST", s.base_url + "/chat/completions", timeout=120,
                    json=_body(p, temperature=0, stream=True)) as r:
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
  assert events[-1] == "[DONE]"
  chunks = [json.loads(e) for e in events[:-1]]
  assert all(c["object"] == "chat.completion.chunk" for c in chunks)
  text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
  assert text == ref
  assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_max_tokens_stop_and_n(server, policy, prompts_and_references):
  s, _ = server
  p, full = prompts_and_references[0][2], prompts_and_references[1][2]
  tok = policy[2]
  r = httpx.post(s.base_url + "/chat/completions", timeout=120,
                 json=_body(p, temperature=0, max_tokens=3)).json()
  assert r["choices"][0]["finish_reason"] == "length"
  assert r["usage"]["completion_tokens"] == 3
  assert r["choices"][0]["message"]["content"] == tok.decode(tok.encode(full)[:3])
  r = httpx.post(s.base_url + "/chat/completions", timeout=120,
                 json=_body(p, temperature=0, stop=["\n"])).json()
  assert r["choices"][0]["message"]["content"] == full.split("\n")[0]
  assert r["choices"][0]["finish_reason"] == "stop"
  r = httpx.post(s.base_url + "/chat/completions", timeout=120,
                 json=_body(p, temperature=0, n=3)).json()
  assert [c["index"] for c in r["choices"]] == [0, 1, 2]
  assert [c["message"]["content"] for c in r["choices"]] == [full] * 3


def test_bad_requests_get_json_400s(server):
  s, _ = server
  url = s.base_url + "/chat/completions"
  r = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
  assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
  r = httpx.post(url, json=_body("dose " * 200))
  assert r.status_code == 400
  err = r.json()["error"]
  assert err["code"] == "context_length_exceeded" and "serve.prompt_len" in err["message"]
  r = httpx.post(url, json=_body(top_p=2))
  assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"


def test_engine_refuses_a_budget_over_max_seq_len(policy):
  graphdef, params, tok, mesh = policy
  with pytest.raises(ValueError, match="max_seq_len"):
    serve.Engine(graphdef, params, tok, _cfg(prompt_len=250, max_new_tokens=64), mesh)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_serve_job_answers_over_http():
  """The job itself, in its own process, as `launch/main.py` runs it."""
  port = _free_port()
  code = ("import sys; sys.argv=['x']; from configs import serve as c; "
          "from deepimagine_jax import serve; cfg = c.get_config('tiny'); "
          f"cfg.serve.checkpoint = {tiny_policy.run_dir()!r}; cfg.serve.port = {port}; "
          "cfg.serve.batch_size = 1; "  # one row bucket: the start-up compiles once
          "serve.serve(cfg, '')")
  env = test_entry.launch_env(1)
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 120
    while True:
      try:
        if httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 200:
          break
      except httpx.TransportError:
        pass
      assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
      time.sleep(0.2)
    r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                   json=_body(tiny_policy.examples(1)[0].prompt, max_tokens=40))
    assert r.status_code == 200, r.text
    assert "DECISION:" in r.json()["choices"][0]["message"]["content"]
  finally:
    proc.terminate()
    proc.wait(timeout=30)
  assert serve_config.get_config("tiny").serve.prompt_len == 128
