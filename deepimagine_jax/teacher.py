"""A client for any OpenAI-compatible chat-completions endpoint, built to run for hours.

At most `max_concurrency` requests in flight (httpx); 429, 5xx, timeouts and
connection errors are retried with jittered exponential back-off (tenacity),
other 4xx are not. Every answer is appended to an on-disk cache keyed by
(model, messages, sampling settings) the moment it arrives (one JSON line, flushed
and fsynced), so a re-run sends nothing twice and a run killed at any point resumes
where it stopped; a line torn by a kill is counted and ignored. The API key is
read from the environment variable the config names, at run time; it is never
written anywhere. A request that still fails is counted by reason, never fatal,
and is not cached, so the next run tries it again.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import os
from typing import Sequence

import httpx
import tenacity
import tqdm

from data_pipeline import io
from data_pipeline.build_report import BuildReport
from deepimagine_jax.serve_config import TeacherConfig

CACHE_SOURCE = "teacher_cache"


@dataclasses.dataclass(frozen=True)
class Answer:
  """One cached answer: the first choice's text and the endpoint's `created` time."""
  content: str
  model: str
  created: int


class RetryableStatus(Exception):
  """A 429 or 5xx answer: worth another try."""

  def __init__(self, status: int, text: str):
    super().__init__(f"HTTP {status}: {text[:200]}")
    self.status = status


def request_body(cfg: TeacherConfig, messages: Sequence[dict]) -> dict:
  return {"model": cfg.model, "messages": list(messages), "temperature": cfg.temperature,
          "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}


def cache_key(body: dict) -> str:
  """sha256 of the canonical request: model, messages and sampling settings."""
  return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Cache:
  """An append-only JSON-lines file of {key, answer}; loaded whole at start."""

  def __init__(self, path: str | os.PathLike):
    self.path = path
    self.report = BuildReport()
    self.answers: dict[str, Answer] = {}
    if os.path.exists(path):
      for row in io.read_jsonl(path, self.report, CACHE_SOURCE):
        try:
          self.answers[row["key"]] = Answer(**row["answer"])
        except (KeyError, TypeError):
          self.report.add_skip(CACHE_SOURCE, "bad_row", str(row)[:80])
      with open(path, "rb") as f:
        data = f.read()
      if data and not data.endswith(b"\n"):  # a kill mid-line: the next line starts afresh
        with open(path, "a", encoding="utf-8") as f:
          f.write("\n")

  def add(self, key: str, answer: Answer) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    line = json.dumps({"key": key, "answer": dataclasses.asdict(answer)}, ensure_ascii=False)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(line + "\n")
      f.flush()
      os.fsync(f.fileno())
    self.answers[key] = answer


def _retryable(e: BaseException) -> bool:
  return isinstance(e, (RetryableStatus, httpx.TransportError))  # timeouts are TransportErrors


def _failure_reason(e: BaseException) -> str:
  if isinstance(e, RetryableStatus):
    return f"http_{e.status}"
  if isinstance(e, httpx.HTTPStatusError):
    return f"http_{e.response.status_code}"
  if isinstance(e, httpx.TimeoutException):
    return "timeout"
  if isinstance(e, httpx.TransportError):
    return "connection"
  return "bad_response"


async def _ask(client: httpx.AsyncClient, cfg: TeacherConfig, body: dict) -> Answer:
  retrying = tenacity.AsyncRetrying(
      stop=tenacity.stop_after_attempt(cfg.max_attempts),
      wait=tenacity.wait_exponential_jitter(initial=cfg.backoff_s, max=cfg.backoff_max_s),
      retry=tenacity.retry_if_exception(_retryable), reraise=True)
  async for attempt in retrying:
    with attempt:
      r = await client.post("chat/completions", json=body)
      if r.status_code == 429 or r.status_code >= 500:
        raise RetryableStatus(r.status_code, r.text)
      r.raise_for_status()
  data = r.json()
  try:
    return Answer(content=data["choices"][0]["message"]["content"],
                  model=str(data.get("model") or body["model"]), created=int(data["created"]))
  except (KeyError, IndexError, TypeError, ValueError) as e:
    raise ValueError(f"not a chat completion: {str(data)[:200]}") from e


def api_key(cfg: TeacherConfig) -> str:
  """The key from `teacher.api_key_env` ("" names none); an unset variable is an error."""
  if not cfg.api_key_env:
    return ""
  key = os.environ.get(cfg.api_key_env)
  if key is None:
    raise ValueError(f"teacher.api_key_env: the environment variable {cfg.api_key_env!r} is not "
                     "set (set it, or set teacher.api_key_env='' for an endpoint without a key)")
  return key


async def _ask_all(cfg: TeacherConfig, bodies: dict[str, dict], cache: Cache, key: str,
                   progress: bool) -> collections.Counter:
  failures = collections.Counter()
  todo = [k for k in bodies if k not in cache.answers]
  sem = asyncio.Semaphore(cfg.max_concurrency)
  headers = {"Authorization": f"Bearer {key}"} if key else {}
  bar = tqdm.tqdm(total=len(bodies), initial=len(bodies) - len(todo), desc="teacher",
                  unit="req", disable=not progress, dynamic_ncols=True)
  limits = httpx.Limits(max_connections=cfg.max_concurrency)
  async with httpx.AsyncClient(base_url=cfg.base_url.rstrip("/") + "/", headers=headers,
                               timeout=cfg.timeout_s, limits=limits) as client:

    async def one(k):
      async with sem:
        try:
          cache.add(k, await _ask(client, cfg, bodies[k]))
        except (httpx.HTTPError, RetryableStatus, ValueError) as e:
          failures[_failure_reason(e)] += 1
          bar.set_postfix(failed=sum(failures.values()))
        bar.update(1)

    await asyncio.gather(*(one(k) for k in todo))
  bar.close()
  return failures


def ask_all(cfg: TeacherConfig, messages: Sequence[Sequence[dict]], cache_path: str, *,
            progress: bool = True) -> tuple[list[Answer | None], dict]:
  """The endpoint's answer to each conversation (None where it failed) and the counts.

  Answers already in the cache at `cache_path` are not sent again.
  """
  cache = Cache(cache_path)
  bodies = [request_body(cfg, m) for m in messages]
  keys = [cache_key(b) for b in bodies]
  n_cached = sum(k in cache.answers for k in set(keys))
  failures = asyncio.run(_ask_all(cfg, dict(zip(keys, bodies)), cache, api_key(cfg), progress))
  counts = {"requests": len(set(keys)), "cached": n_cached,
            "sent_ok": len(set(keys)) - n_cached - sum(failures.values()),
            "failed": dict(failures),
            "cache_skipped": dict(cache.report.skipped.get(CACHE_SOURCE, {}))}
  return [cache.answers.get(k) for k in keys], counts
