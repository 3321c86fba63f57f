"""The policy behind an OpenAI-compatible HTTP endpoint (starlette + uvicorn).

  POST /v1/chat/completions   messages, temperature, top_p, max_tokens, n, stop, stream
  GET  /v1/models

Requests queue; the first one waits `batch_wait_ms` for company, then every
queued request with the same sampling settings (temperature, top_p, max_tokens
bucket: the sampler compiles per setting) shares one `sampler.sample` call padded
to [rows, prompt_len], rows a power of two up to batch_size, so the shapes are few
and a new request recompiles nothing once each has been seen. A
request asking for n samples takes n rows. The prompt is the messages' contents
joined by newlines after BOS: the policy was trained on `[BOS] prompt completion`
with no chat template, so one user message holding an example's prompt is
exactly what it saw in training. A prompt longer than `serve.prompt_len` is a
400 `context_length_exceeded`, never cut. Stop strings are applied to the
decoded text. Streaming sends OpenAI's chunk format by server-sent events once
the completion is sampled: the sampler never leaves the device mid-sequence, so
it streams the format, not token-by-token latency.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
import time
import uuid

import jax
import numpy as np
import uvicorn
from flax import nnx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from deepimagine_jax import sampler
from deepimagine_jax import sharding
from deepimagine_jax.config import MeshConfig
from deepimagine_jax.serve_config import ServeConfig, typed

ROLES = ("system", "user", "assistant")
FIELDS = ("model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens",
          "n", "stop", "stream", "user")
MAX_STOP = 4  # OpenAI's limit
MIN_BUCKET = 16


class RequestError(Exception):
  """A request the server refuses: an OpenAI-style error body with this status."""

  def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_value",
               status: int = 400):
    super().__init__(message)
    self.param, self.code, self.status = param, code, status

  def response(self) -> JSONResponse:
    kind = "invalid_request_error" if self.status < 500 else "server_error"
    return JSONResponse({"error": {"message": str(self), "type": kind, "param": self.param,
                                   "code": self.code}}, status_code=self.status)


@dataclasses.dataclass(frozen=True)
class ChatRequest:
  """A validated request; `prompt` is the text the policy continues."""
  prompt: str
  temperature: float
  top_p: float
  max_tokens: int
  n: int
  stop: tuple[str, ...]
  stream: bool


@dataclasses.dataclass(frozen=True)
class Choice:
  text: str
  finish_reason: str  # "stop" (EOS or a stop string) | "length"
  completion_tokens: int


def _number(body, key, default, lo, hi, *, integer=False, lo_open=False):
  v = body.get(key, default)  # an absent OpenAI field takes OpenAI's documented default
  if v is None:
    v = default
  ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
  if isinstance(v, bool) or not ok_type:
    raise RequestError(f"{key} must be {'an integer' if integer else 'a number'}, got {v!r}",
                       param=key)
  if (v <= lo if lo_open else v < lo) or v > hi:
    raise RequestError(f"{key} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}",
                       param=key)
  return v


def _content(i: int, m) -> str:
  if not isinstance(m, dict) or m.get("role") not in ROLES:
    raise RequestError(f"messages[{i}] must be an object with role one of {ROLES}",
                       param=f"messages[{i}]")
  c = m.get("content")
  if isinstance(c, list):  # content parts: text only
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
               for p in c):
      raise RequestError(f"messages[{i}].content: only text parts are supported",
                         param=f"messages[{i}].content")
    return "".join(p["text"] for p in c)
  if not isinstance(c, str):
    raise RequestError(f"messages[{i}].content must be a string", param=f"messages[{i}].content")
  return c


def parse_request(body, cfg: ServeConfig) -> ChatRequest:
  """Validates a chat-completions body; RequestError names the offending field."""
  if not isinstance(body, dict):
    raise RequestError("the request body must be a JSON object")
  unknown = sorted(set(body) - set(FIELDS))
  if unknown:
    raise RequestError(f"unsupported field(s) {unknown}; supported: {list(FIELDS)}",
                       param=unknown[0], code="unsupported_parameter")
  if body.get("model") != cfg.model_name:
    raise RequestError(f"model {body.get('model')!r} does not exist; this server has "
                       f"{cfg.model_name!r}", param="model", code="model_not_found", status=404)
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise RequestError("messages must be a non-empty list", param="messages")
  prompt = "\n".join(_content(i, m) for i, m in enumerate(messages))
  max_key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
  stop = body.get("stop")
  stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
  if (not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOP
      or not all(isinstance(s, str) and s for s in stop)):
    raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOP}",
                       param="stop")
  stream = body.get("stream", False)
  if not isinstance(stream, bool):
    raise RequestError("stream must be a boolean", param="stream")
  return ChatRequest(
      prompt=prompt,
      temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
      top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)),
      max_tokens=_number(body, max_key, cfg.max_new_tokens, 1, cfg.max_new_tokens, integer=True),
      n=_number(body, "n", 1, 1, cfg.batch_size, integer=True),
      stop=tuple(stop), stream=stream)


def bucket(max_tokens: int, cap: int) -> int:
  """The sampler's max_new_tokens for a request: a power of two >= MIN_BUCKET, at most cap.

  Few distinct values, so few compilations; a request never gets more than it asked
  (its tokens are cut to its own max_tokens).
  """
  b = MIN_BUCKET
  while b < max_tokens:
    b *= 2
  return min(b, cap)


def row_bucket(rows: int, batch_size: int) -> int:
  """Rows of the sampler call: a power of two >= rows, at most batch_size. A lone request
  does not pay for a full batch of padding; the shapes stay few (log2 batch_size + 1)."""
  b = 1
  while b < rows:
    b *= 2
  return min(b, batch_size)


def apply_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
  """text cut before the earliest stop string, and whether one was found."""
  cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
  return (text[:min(cuts)], True) if cuts else (text, False)


class Engine:
  """Tokenizes, pads to the one batch shape, samples, decodes. Not thread-safe: one caller."""

  def __init__(self, graphdef, params, tokenizer, cfg: ServeConfig, mesh=None, seed: int = 0):
    max_seq_len = nnx.merge(graphdef, params).cfg.max_seq_len
    if cfg.prompt_len + cfg.max_new_tokens > max_seq_len:
      raise ValueError(f"serve.prompt_len {cfg.prompt_len} + serve.max_new_tokens "
                       f"{cfg.max_new_tokens} exceeds the model's max_seq_len {max_seq_len}")
    self.graphdef, self.params, self.tok, self.cfg, self.mesh = (
        graphdef, params, tokenizer, cfg, mesh)
    self._key = jax.random.key(seed)
    self.calls = 0

  def encode(self, prompt: str) -> list[int]:
    head, body = self.tok.prompt_ids(prompt)  # BOS or the chat template's turn, as trained
    ids = head + body
    if len(ids) > self.cfg.prompt_len:
      raise RequestError(f"the prompt is {len(ids)} tokens (BOS / chat turn included); this "
                         f"server takes "
                         f"at most {self.cfg.prompt_len} (serve.prompt_len)",
                         param="messages", code="context_length_exceeded")
    return ids

  def generate(self, rows: list[list[int]], max_tokens: list[int], *, temperature: float,
               top_p: float, new_tokens: int) -> list[tuple[list[int], bool]]:
    """(completion ids without EOS, ended by EOS) per row, each cut to its max_tokens."""
    if len(rows) > self.cfg.batch_size:
      raise ValueError(f"{len(rows)} rows exceed serve.batch_size {self.cfg.batch_size}")
    B, P = row_bucket(len(rows), self.cfg.batch_size), self.cfg.prompt_len
    prompt_QP = np.full((B, P), self.tok.pad_id, np.int32)
    mask_QP = np.zeros((B, P), np.int32)
    for q, ids in enumerate(rows):
      prompt_QP[q, P - len(ids):] = ids
      mask_QP[q, P - len(ids):] = 1
    key = jax.random.fold_in(self._key, self.calls)
    self.calls += 1
    with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
      out = sampler.sample(self.graphdef, self.params, prompt_QP, mask_QP, key,
                           max_new_tokens=new_tokens, temperature=temperature, top_p=top_p,
                           eos_id=self.tok.eos_id, pad_id=self.tok.pad_id,
                           cache_dtype=self.cfg.cache_dtype)
    tokens_BC, lengths_B = jax.device_get((out.tokens, out.lengths))
    results = []
    for q in range(len(rows)):
      ids = [int(t) for t in tokens_BC[q, :lengths_B[q]]]
      eos = bool(ids) and ids[-1] == self.tok.eos_id
      ids = ids[:-1] if eos else ids
      if len(ids) >= max_tokens[q]:
        eos = eos and len(ids) < max_tokens[q]
        ids = ids[:max_tokens[q]]
      results.append((ids, eos))
    return results

  def warmup(self, *, temperature: float, top_p: float, max_tokens: int) -> None:
    """Compiles every row bucket for one setting, so no request of it waits for XLA."""
    rows = 1
    while True:
      filler = self.tok.bos_id if self.tok.bos_id is not None else 0  # Qwen3 has no BOS
      self.generate([[filler]] * rows, [1] * rows, temperature=temperature,
                    top_p=top_p, new_tokens=bucket(max_tokens, self.cfg.max_new_tokens))
      if rows >= self.cfg.batch_size:
        return
      rows = min(rows * 2, self.cfg.batch_size)

  def choice(self, ids: list[int], eos: bool, stop: tuple[str, ...]) -> Choice:
    text, stopped = apply_stop(self.tok.decode(ids), stop)
    n = len(ids)
    if stopped:  # the fewest tokens whose text covers what is returned
      n = next(k for k in range(len(ids) + 1) if len(self.tok.decode(ids[:k])) >= len(text))
    return Choice(text, "stop" if eos or stopped else "length", n)


@dataclasses.dataclass
class _Job:
  request: ChatRequest
  ids: list[int]
  future: asyncio.Future
  key: tuple  # jobs with equal keys can share a sampler call


class Batcher:
  """The queue: requests that arrive within `batch_wait_ms` share one sampler call."""

  def __init__(self, engine: Engine):
    self.engine = engine
    self._pending: list[_Job] = []
    self._wake = asyncio.Event()
    self.batch_sizes: list[int] = []  # requests per sampler call (for the bench)

  async def submit(self, request: ChatRequest, ids: list[int]) -> list[Choice]:
    new_tokens = bucket(request.max_tokens, self.engine.cfg.max_new_tokens)
    job = _Job(request, ids, asyncio.get_running_loop().create_future(),
               (request.temperature, request.top_p, new_tokens))
    self._pending.append(job)
    self._wake.set()
    return await job.future

  def _take(self) -> list[_Job]:
    """The oldest job and the later ones that share its settings and still fit."""
    key = self._pending[0].key
    taken, rows = [], 0
    for job in self._pending:
      if job.key == key and rows + job.request.n <= self.engine.cfg.batch_size:
        taken.append(job)
        rows += job.request.n
    self._pending = [j for j in self._pending if j not in taken]
    return taken

  async def run(self):
    while True:
      await self._wake.wait()
      await asyncio.sleep(self.engine.cfg.batch_wait_ms / 1000)
      while self._pending:
        jobs = self._take()
        await self._serve(jobs)
      self._wake.clear()

  async def _serve(self, jobs: list[_Job]):
    rows = [j.ids for j in jobs for _ in range(j.request.n)]
    limits = [j.request.max_tokens for j in jobs for _ in range(j.request.n)]
    temperature, top_p, new_tokens = jobs[0].key
    try:
      out = await asyncio.to_thread(self.engine.generate, rows, limits, temperature=temperature,
                                    top_p=top_p, new_tokens=new_tokens)
    except Exception as e:  # noqa: BLE001 - every waiting request gets the error
      logging.exception("sampler call failed")
      for j in jobs:
        if not j.future.done():
          j.future.set_exception(e)
      return
    self.batch_sizes.append(len(jobs))
    for j in jobs:
      mine, out = out[:j.request.n], out[j.request.n:]
      if not j.future.done():  # a client that went away cancelled its future
        j.future.set_result([self.engine.choice(ids, eos, j.request.stop) for ids, eos in mine])


def _completion_body(cid, created, model, choices, prompt_tokens):
  return {
      "id": cid, "object": "chat.completion", "created": created, "model": model,
      "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                   "finish_reason": c.finish_reason, "logprobs": None}
                  for i, c in enumerate(choices)],
      "usage": {"prompt_tokens": prompt_tokens,
                "completion_tokens": sum(c.completion_tokens for c in choices),
                "total_tokens": prompt_tokens + sum(c.completion_tokens for c in choices)}}


def _sse(cid, created, model, choices):
  """OpenAI's streaming chunks for finished choices: role, content, finish, [DONE]."""
  def chunk(i, delta, finish):
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    return f"data: {json.dumps(body)}\n\n"

  for i, c in enumerate(choices):
    yield chunk(i, {"role": "assistant", "content": ""}, None)
    if c.text:
      yield chunk(i, {"content": c.text}, None)
    yield chunk(i, {}, c.finish_reason)
  yield "data: [DONE]\n\n"


def make_app(engine: Engine) -> Starlette:
  """The ASGI app; the batcher runs as a task of the app's lifespan."""
  cfg = engine.cfg
  batcher = Batcher(engine)
  started = int(time.time())

  async def models(request: Request):
    return JSONResponse({"object": "list", "data": [
        {"id": cfg.model_name, "object": "model", "created": started,
         "owned_by": "deepimagine-jax"}]})

  async def chat(request: Request):
    try:
      try:
        body = json.loads(await request.body())
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the body is not JSON: {e}", code="invalid_json") from e
      req = parse_request(body, cfg)
      ids = engine.encode(req.prompt)
      choices = await batcher.submit(req, ids)
    except RequestError as e:
      return e.response()
    except Exception as e:  # noqa: BLE001 - the client gets a JSON 500, the log the trace
      return RequestError(f"sampling failed: {type(e).__name__}: {e}", code="server_error",
                          status=500).response()
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
      return StreamingResponse(_sse(cid, created, cfg.model_name, choices),
                               media_type="text/event-stream")
    return JSONResponse(_completion_body(cid, created, cfg.model_name, choices, len(ids)))

  @contextlib.asynccontextmanager
  async def lifespan(app):
    task = asyncio.create_task(batcher.run())
    yield
    task.cancel()

  app = Starlette(routes=[Route("/v1/models", models, methods=["GET"]),
                          Route("/v1/chat/completions", chat, methods=["POST"])],
                  lifespan=lifespan)
  app.state.batcher = batcher
  return app


class ServerThread:
  """uvicorn serving `app` in a background thread (tests, the bench); port 0 = a free one."""

  def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
    self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                lifespan="on"))
    self.thread = threading.Thread(target=self.server.run, daemon=True)

  def __enter__(self) -> "ServerThread":
    self.thread.start()
    deadline = time.monotonic() + 60
    while not self.server.started:
      if not self.thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError("the server did not start")
      time.sleep(0.01)
    return self

  @property
  def base_url(self) -> str:
    host, port = self.server.servers[0].sockets[0].getsockname()[:2]
    return f"http://{host}:{port}/v1"

  def __exit__(self, *exc):
    self.server.should_exit = True
    self.thread.join(timeout=30)
    return False


def serve(config, workdir: str):
  """The serve job: loads `serve.checkpoint`'s policy and serves it until interrupted."""
  del workdir  # serving writes nothing
  from deepimagine_jax import jobs  # jobs lists this job: imported at call time
  cfg = typed(ServeConfig, config.serve)
  if not cfg.checkpoint:
    raise ValueError("serve.checkpoint: name a finished run's workdir "
                     "(--config.serve.checkpoint=runs/sft)")
  mesh = sharding.mesh_from_config(typed(MeshConfig, config.mesh))
  graphdef, params, tokenizer = jobs.load_policy(cfg.checkpoint, mesh, cfg.dtype)
  engine = Engine(graphdef, params, tokenizer, cfg, mesh, seed=config.seed)
  logging.info("compiling the sampler for the default settings (temperature 1, top_p 1)")
  engine.warmup(temperature=1.0, top_p=1.0, max_tokens=cfg.max_new_tokens)
  logging.info("serving %s as %r on http://%s:%d/v1", cfg.checkpoint, cfg.model_name,
               cfg.host, cfg.port)
  uvicorn.run(make_app(engine), host=cfg.host, port=cfg.port, log_level="info")
