"""The API v2 client against a server on 127.0.0.1 that serves recorded pages made from the
real study files: pagination, parameters, cache, retries (429 / 5xx / timeout / truncated
body), the rate limit, counted bad studies, and a kill -9 mid-run that resumes."""
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

from data_pipeline import ctgov_api as api
from data_pipeline.build_report import BuildReport
from data_pipeline.readers.ctgov_json import read_ctgov_json

PATH = "/api/v2/studies"
TERM = "atopic dermatitis"
FAST = api.Retry(max_attempts=4, backoff_s=0.001, backoff_max_s=0.01, timeout_s=5.0)


class Recorded:
  """Pages of `page_size` studies, chained by opaque tokens, plus scripted failures."""

  def __init__(self, studies, page_size, term=TERM, fields=""):
    self.page_size, self.term, self.fields = page_size, term, fields
    chunks = [studies[i:i + page_size] for i in range(0, len(studies), page_size)]
    self.tokens = [""] + [f"tok{i}x{len(studies)}" for i in range(1, len(chunks))]
    self.pages = {}
    for i, chunk in enumerate(chunks):
      page = {"studies": chunk}
      if i + 1 < len(chunks):
        page["nextPageToken"] = self.tokens[i + 1]
      self.pages[self.tokens[i]] = json.dumps(page).encode()
    self.log = []  # (monotonic time, pageToken) of every request that passed the checks
    self.script = {}  # token -> list of actions used up one per request
    self.lock = threading.Lock()

  def respond(self, handler):
    url = urllib.parse.urlparse(handler.path)
    q = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
    want = {"query.term": self.term, "pageSize": str(self.page_size), "format": "json"}
    if self.fields:
      want["fields"] = self.fields
    bad = {k: q.get(k) for k, v in want.items() if q.get(k) != v}
    token = q.get("pageToken", "")
    if url.path != PATH or bad or token not in self.pages:
      return 400, {}, f"bad request: {url.path} {bad} token={token!r}".encode()
    with self.lock:
      self.log.append((time.monotonic(), token))
      actions = self.script.get(token, [])
      action = actions.pop(0) if actions else None
    if isinstance(action, threading.Event):  # hang until released
      action.wait(30)
      return 503, {}, b"released"
    if isinstance(action, float):  # answer late
      time.sleep(action)
    elif action == "truncated":
      return 200, {}, self.pages[token][:50]
    elif isinstance(action, tuple):
      return action[0], action[1], b"scripted failure"
    return 200, {"Content-Type": "application/json"}, self.pages[token]

  def tokens_requested(self):
    return [t for _, t in self.log]


@pytest.fixture
def server():
  holder = {}

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
      status, headers, body = holder["recorded"].respond(self)
      try:
        self.send_response(status)
        for k, v in headers.items():
          self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
      except (BrokenPipeError, ConnectionResetError):
        pass  # the client gave up (a timeout test, or a killed client)

    def log_message(self, *args):
      pass

  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # a free port
  httpd.daemon_threads = True
  thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
  thread.start()
  holder["url"] = f"http://127.0.0.1:{httpd.server_address[1]}{PATH}"
  yield holder
  httpd.shutdown()
  httpd.server_close()


@pytest.fixture(scope="module")
def studies(data_root):
  """The three real API v2 records (two with results, one without), in NCT order."""
  return [json.loads(p.read_text()) for p in sorted((data_root / "ctgov_json").glob("*.json"))]


def _serve(server, studies, page_size=1, **kw):
  server["recorded"] = rec = Recorded(studies, page_size, **kw)
  return rec


def _query(page_size=1, fields=()):
  return api.Query((("query.term", TERM),), page_size, tuple(fields))


def _fetch(server, out, page_size=1, **kw):
  kw.setdefault("retry", FAST)
  kw.setdefault("min_interval_s", 0.0)
  return api.fetch_studies(_query(page_size, kw.pop("fields", ())), out,
                           base_url=server["url"], **kw)


def _state(out):
  (path,) = (out / api.STATE_DIR).glob("state-*.json")
  return json.loads(path.read_text())


def test_pages_in_order_studies_where_the_json_reader_reads_them(server, studies, tmp_path,
                                                                 data_root):
  fields = ("protocolSection", "resultsSection", "derivedSection", "hasResults")
  rec = _serve(server, studies, page_size=2, fields=",".join(fields))
  r = _fetch(server, tmp_path, page_size=2, fields=fields)
  assert (r.pages_fetched, r.pages_cached, r.studies_written, r.done) == (2, 0, 3, True)
  assert rec.tokens_requested() == rec.tokens  # first page without a token, then each token
  for st in studies:
    nct = st["protocolSection"]["identificationModule"]["nctId"]
    assert json.loads((tmp_path / f"{nct}.json").read_text()) == st
  got, want = BuildReport(), BuildReport()
  assert read_ctgov_json(tmp_path, got) == read_ctgov_json(data_root / "ctgov_json", want)
  assert got.to_dict() == want.to_dict()  # the state folder is never read as a study
  assert _state(tmp_path)["done"] and _state(tmp_path)["studies"] == 3


def test_rerun_fetches_nothing_even_without_its_state(server, studies, tmp_path):
  rec = _serve(server, studies)
  assert _fetch(server, tmp_path).pages_fetched == 3
  again = _fetch(server, tmp_path)
  assert (again.pages_fetched, again.pages_cached, again.done) == (0, 0, True)
  for p in (tmp_path / api.STATE_DIR).glob("state-*.json"):
    p.unlink()
  for p in tmp_path.glob("*.json"):
    p.unlink()
  cached = _fetch(server, tmp_path)
  assert (cached.pages_fetched, cached.pages_cached, cached.studies_written) == (0, 3, 3)
  assert len(rec.log) == 3


def test_429_waits_at_least_retry_after_then_succeeds(server, studies, tmp_path):
  rec = _serve(server, studies)
  rec.script[""] = [(429, {"Retry-After": "7"})]
  slept = []
  retry = api.Retry(max_attempts=3, backoff_s=0.5, backoff_max_s=30.0, timeout_s=5.0)
  r = _fetch(server, tmp_path, retry=retry, sleep=slept.append)
  assert r.done and rec.tokens_requested() == ["", *rec.tokens]
  assert slept == [pytest.approx(7.0)]  # Retry-After beats the 0.5-1.0 s back-off


def test_5xx_back_off_doubles(server, studies, tmp_path):
  rec = _serve(server, studies)
  rec.script[rec.tokens[1]] = [(500, {}), (503, {}), (502, {})]
  slept = []
  retry = api.Retry(max_attempts=4, backoff_s=1.0, backoff_max_s=60.0, timeout_s=5.0)
  r = _fetch(server, tmp_path, retry=retry, sleep=slept.append)
  assert r.done and rec.tokens_requested().count(rec.tokens[1]) == 4
  # initial * 2**n plus up to `backoff_s` of jitter (tenacity's wait_exponential_jitter)
  assert len(slept) == 3 and all(2 ** n <= s < 2 ** n + 1 for n, s in enumerate(slept))


def test_failure_past_the_retries_names_the_url_and_the_next_run_resumes(server, studies,
                                                                         tmp_path):
  rec = _serve(server, studies)
  rec.script[rec.tokens[1]] = [(500, {})] * 4
  with pytest.raises(api.ApiError, match=rf"127\.0\.0\.1.*pageToken={rec.tokens[1]}.*4 attempts"):
    _fetch(server, tmp_path)
  assert _state(tmp_path)["next_page_token"] == rec.tokens[1]
  assert [p.name for p in tmp_path.glob("*.json")] == ["NCT00763412.json"]
  n = len(rec.log)
  r = _fetch(server, tmp_path)
  assert r.done and r.pages_fetched == 2 and rec.tokens_requested()[n:] == rec.tokens[1:]


def test_timeout_and_truncated_body_are_retried_and_never_cached(server, studies, tmp_path):
  rec = _serve(server, studies)
  rec.script[""] = [1.0]  # answers after the client's 0.3 s timeout
  rec.script[rec.tokens[2]] = ["truncated"]
  retry = api.Retry(max_attempts=3, backoff_s=0.001, backoff_max_s=0.01, timeout_s=0.3)
  r = _fetch(server, tmp_path, retry=retry)
  assert r.done and r.studies_written == 3
  assert rec.tokens_requested() == ["", "", rec.tokens[1], rec.tokens[2], rec.tokens[2]]
  for p in (tmp_path / api.STATE_DIR / "cache").glob("*.json"):
    assert "studies" in json.loads(p.read_text())


def test_other_status_is_an_error_at_once(server, studies, tmp_path):
  rec = _serve(server, studies, term="something else")  # the server answers 400
  with pytest.raises(api.ApiError, match="HTTP 400: bad request"):
    _fetch(server, tmp_path)
  assert rec.log == [] and not list(tmp_path.glob("*.json"))


def test_rate_limit_spaces_requests(server, studies, tmp_path):
  rec = _serve(server, studies)
  _fetch(server, tmp_path, min_interval_s=0.25)
  times = [t for t, _ in rec.log]
  # spaced at the client; arrival at the server may shift each (by up to ~0.1 s on a loaded
  # machine), so the bounds leave that much slack below the 0.25 s interval
  assert len(times) == 3 and min(b - a for a, b in zip(times, times[1:])) >= 0.15
  assert times[-1] - times[0] >= 0.4


def test_studies_without_a_usable_nct_id_are_counted_not_written(server, studies, tmp_path):
  bad = [{"protocolSection": {"identificationModule": {}}},
         {"protocolSection": {"identificationModule": {"nctId": "../../etc/x"}}}, "a string"]
  _serve(server, [studies[0], *bad], page_size=4)
  r = _fetch(server, tmp_path, page_size=4)
  assert r.studies_written == 1 and r.report.n_read(api.SOURCE) == 1
  assert r.report.skipped[api.SOURCE] == {"no_nct_id": 2, "bad_nct_id": 1}
  assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()
                and api.STATE_DIR not in p.parts) == ["NCT00763412.json"]


def test_max_pages_stops_and_continues(server, studies, tmp_path):
  rec = _serve(server, studies)
  first = _fetch(server, tmp_path, max_pages=2)
  assert (first.pages_fetched, first.done, first.next_page_token) == (2, False, rec.tokens[2])
  rest = _fetch(server, tmp_path, max_pages=2)
  assert (rest.pages_fetched, rest.done) == (1, True) and rec.tokens_requested() == rec.tokens


def test_kill_mid_run_resumes_at_the_page_it_was_on(server, studies, tmp_path):
  """The command run as a user runs it, killed with SIGKILL while waiting for page 3."""
  rec = _serve(server, studies)
  release = threading.Event()
  rec.script[rec.tokens[2]] = [release]
  cmd = [sys.executable, "-m", "data_pipeline.ctgov_api", f"--query={TERM}", "--page_size=1",
         f"--out={tmp_path}", f"--base_url={server['url']}", "--min_interval_s=0"]
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.monotonic() + 60
    while rec.tokens[2] not in rec.tokens_requested():
      assert proc.poll() is None, proc.stderr.read().decode()
      assert time.monotonic() < deadline, "the client never asked for page 3"
      time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
  finally:
    release.set()
    if proc.poll() is None:
      proc.kill()
  assert _state(tmp_path)["next_page_token"] == rec.tokens[2]
  assert len(list(tmp_path.glob("*.json"))) == 2
  n = len(rec.log)
  r = _fetch(server, tmp_path)
  assert rec.tokens_requested()[n:] == [rec.tokens[2]]  # pages 1-2 not fetched again
  assert (r.pages_fetched, r.studies_written, r.done) == (1, 1, True)
  for st in studies:
    nct = st["protocolSection"]["identificationModule"]["nctId"]
    assert json.loads((tmp_path / f"{nct}.json").read_text()) == st


def test_command_line_errors_name_the_flag(tmp_path):
  with pytest.raises(SystemExit):
    api.main([f"--out={tmp_path}", "--query=x", "--page_size=0"])
  with pytest.raises(SystemExit):
    api.main([f"--out={tmp_path}"])
  with pytest.raises(SystemExit):
    api.main([f"--out={tmp_path}", "--param=novalue"])
