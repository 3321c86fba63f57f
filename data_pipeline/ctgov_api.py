"""A paginated ClinicalTrials.gov API v2 client that writes one `<NCT id>.json` per study
into `out`, the folder the JSON reader reads (readers/ctgov_json.py): point it at
`<data root>/ctgov_json` and the next build reads what it fetched.

    python -m data_pipeline.ctgov_api --query="semaglutide" \\
        --param=aggFilters=results:with --out=../shared/data/ctgov_json

Polite and restartable, because a query can span thousands of pages:
- requests are spaced by at least `min_interval_s` (the registry asks for about 50
  requests a minute per address);
- 429, 5xx, timeouts, dropped connections and a truncated body are retried with
  jittered exponential back-off (tenacity), honouring a 429's Retry-After; any other
  status is an error naming the URL;
- every page is cached under `out/.ctgov_api/cache/` (keyed by its full request), so a
  re-run fetches nothing twice;
- after each page the next page token is written atomically to
  `out/.ctgov_api/state-<query hash>.json`, after the page's studies, so a kill at any
  point resumes at the first page whose studies are not all on disk.
A study without a well-formed NCT id cannot be named on disk: it is counted, not written.
"""
from __future__ import annotations

import argparse
import dataclasses
import email.utils
import hashlib
import json
import pathlib
import re
import time
from typing import Callable, Sequence

import httpx
import tenacity

from data_pipeline import io
from data_pipeline.build_report import BuildReport

API_URL = "https://clinicaltrials.gov/api/v2/studies"
SOURCE = "ctgov_api"
STATE_DIR = ".ctgov_api"  # a folder: the JSON reader globs `*.json` at the top level only
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
NCT_ID = re.compile(r"NCT\d{8}")


class ApiError(RuntimeError):
  """The API refused a request, or kept failing past the retries, or broke its format."""


class TransientError(Exception):
  """Worth another try: a 429 / 5xx, a timeout, a dropped connection, a truncated body."""

  def __init__(self, what: str, retry_after_s: float = 0.0):
    super().__init__(what)
    self.retry_after_s = retry_after_s


@dataclasses.dataclass(frozen=True)
class Query:
  """What one run asks for: API parameters (`query.term`, `filter.*`, ...), page size, fields."""
  params: tuple[tuple[str, str], ...]
  page_size: int
  fields: tuple[str, ...]

  def request_params(self, page_token: str) -> dict[str, str]:
    p = dict(self.params) | {"format": "json", "pageSize": str(self.page_size)}
    if self.fields:
      p["fields"] = ",".join(self.fields)
    if page_token:
      p["pageToken"] = page_token
    return p

  def key(self, base_url: str, page_token: str = "") -> str:
    """sha256 of the request (the cache key) or, without a token, of the query (the state)."""
    body = [base_url, sorted(self.request_params(page_token).items())]
    return hashlib.sha256(json.dumps(body).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Retry:
  """Attempts per page and the jittered exponential back-off between them."""
  max_attempts: int
  backoff_s: float
  backoff_max_s: float
  timeout_s: float


@dataclasses.dataclass
class FetchResult:
  pages_fetched: int  # from the network in this run
  pages_cached: int  # served from the on-disk cache
  studies_written: int
  done: bool  # no next page
  next_page_token: str
  report: BuildReport  # studies counted under SOURCE (read / skipped by reason)


class RateLimit:
  """At least `min_interval_s` between the starts of two requests."""

  def __init__(self, min_interval_s: float, sleep: Callable[[float], None],
               clock: Callable[[], float] = time.monotonic):
    self.min_interval_s, self.sleep, self.clock = min_interval_s, sleep, clock
    self.last = -float("inf")

  def wait(self) -> None:
    gap = self.last + self.min_interval_s - self.clock()
    if gap > 0:
      self.sleep(gap)
    self.last = self.clock()


def _retry_after_s(value: str | None) -> float:
  """Seconds from a Retry-After header (delta seconds or an HTTP date); 0 when absent."""
  if not value:
    return 0.0
  if value.strip().isdigit():
    return float(value)
  try:
    return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
  except (TypeError, ValueError):
    return 0.0


def _get_page(client: httpx.Client, url: str, params: dict, timeout_s: float
              ) -> tuple[bytes, dict]:
  """One attempt: the page's bytes and decoded JSON; raises TransientError or ApiError."""
  try:
    r = client.get(url, params=params, timeout=timeout_s)
  except httpx.TransportError as e:  # timeouts, refused / dropped connections
    raise TransientError(f"{type(e).__name__}: {e}") from e
  if r.status_code in RETRY_STATUS:
    raise TransientError(f"HTTP {r.status_code}", _retry_after_s(r.headers.get("Retry-After")))
  if r.status_code != 200:
    raise ApiError(f"{r.url}: HTTP {r.status_code}: {r.text[:300]}")
  try:
    page = json.loads(r.content)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise TransientError(f"body is not JSON ({len(r.content)} bytes)") from e
  return r.content, page


def _check_page(page, where: str) -> tuple[list, str]:
  if not isinstance(page, dict) or not isinstance(page.get("studies"), list):
    raise ApiError(f"{where}: not an API v2 page (no 'studies' list)")
  token = page.get("nextPageToken", "")
  if not isinstance(token, str):
    raise ApiError(f"{where}: nextPageToken is {type(token).__name__}, not a string")
  return page["studies"], token


def _nct_id(study) -> str:
  try:
    nct = study["protocolSection"]["identificationModule"]["nctId"]
  except (KeyError, TypeError):
    return ""
  return nct if isinstance(nct, str) else ""


def fetch_studies(query: Query, out: str | pathlib.Path, *, base_url: str = API_URL,
                  retry: Retry = Retry(6, 1.0, 60.0, 60.0), min_interval_s: float = 1.2,
                  max_pages: int = 0, cache_dir: str | pathlib.Path = "",
                  sleep: Callable[[float], None] = time.sleep,
                  client: httpx.Client | None = None) -> FetchResult:
  """Fetches the query's pages from where the last run stopped (all, or `max_pages` more)
  and writes their studies to `out/<NCT id>.json`. Raises ApiError naming the URL when a
  page still fails after `retry.max_attempts`; the state then points at that page."""
  out = pathlib.Path(out)
  cache = pathlib.Path(cache_dir) if cache_dir else out / STATE_DIR / "cache"
  state_path = out / STATE_DIR / f"state-{query.key(base_url)[:16]}.json"
  state = json.loads(state_path.read_text()) if state_path.exists() else {
      "query": dict(query.request_params("")), "next_page_token": "", "done": False,
      "pages": 0, "studies": 0}
  result = FetchResult(0, 0, 0, state["done"], state["next_page_token"], BuildReport())
  limit = RateLimit(min_interval_s, sleep)
  retrying = tenacity.Retrying(
      stop=tenacity.stop_after_attempt(retry.max_attempts),
      wait=_wait(retry), retry=tenacity.retry_if_exception_type(TransientError),
      sleep=sleep, reraise=True)
  own_client = client is None
  client = client or httpx.Client(headers={"Accept": "application/json"})
  try:
    while not result.done and (not max_pages or
                               result.pages_fetched + result.pages_cached < max_pages):
      token = result.next_page_token
      params = query.request_params(token)
      cached = cache / f"{query.key(base_url, token)}.json"
      where = f"{base_url}?{httpx.QueryParams(params)}"
      if cached.exists():
        page = json.loads(cached.read_bytes())
        result.pages_cached += 1
      else:
        def attempt():
          limit.wait()
          return _get_page(client, base_url, params, retry.timeout_s)
        try:
          body, page = retrying(attempt)
        except TransientError as e:
          raise ApiError(f"{where}: still failing after {retry.max_attempts} attempts "
                         f"({e}); the next run resumes at this page") from e
        _check_page(page, where)  # never cache a page that is not one
        io.atomic_write(cached, body)
        result.pages_fetched += 1
      studies, result.next_page_token = _check_page(page, where)
      result.done = not result.next_page_token
      written = 0
      for i, study in enumerate(studies):
        nct = _nct_id(study)
        if not NCT_ID.fullmatch(nct):
          result.report.add_skip(SOURCE, "no_nct_id" if not nct else "bad_nct_id",
                                 f"page {state['pages']} study {i}: {nct[:40]}")
          continue
        io.write_json(out / f"{nct}.json", study)
        result.report.add_read(SOURCE)
        written += 1
      result.studies_written += written
      state.update(next_page_token=result.next_page_token, done=result.done,
                   pages=state["pages"] + 1, studies=state["studies"] + written)
      io.write_json(state_path, state)  # after the studies: a kill re-reads this page
  finally:
    if own_client:
      client.close()
  return result


def _wait(retry: Retry):
  """Jittered exponential back-off, but never shorter than the server's Retry-After."""
  backoff = tenacity.wait_exponential_jitter(initial=retry.backoff_s, max=retry.backoff_max_s,
                                             jitter=retry.backoff_s)

  def wait(state: tenacity.RetryCallState) -> float:
    e = state.outcome.exception() if state.outcome else None
    after = min(e.retry_after_s, retry.backoff_max_s) if isinstance(e, TransientError) else 0.0
    return max(backoff(state), after)
  return wait


def _key_value(s: str) -> tuple[str, str]:
  key, sep, value = s.partition("=")
  if not sep or not key:
    raise argparse.ArgumentTypeError(f"--param: expected key=value, got {s!r}")
  return key, value


def main(argv: Sequence[str] | None = None) -> FetchResult:
  p = argparse.ArgumentParser(prog="python -m data_pipeline.ctgov_api", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="folder for <NCT id>.json (the JSON reader's)")
  p.add_argument("--query", default="", help="query.term: free text / Essie expression")
  p.add_argument("--cond", default="", help="query.cond: conditions")
  p.add_argument("--intr", default="", help="query.intr: interventions")
  p.add_argument("--param", type=_key_value, action="append", default=[],
                 help="any other API parameter, key=value (repeatable), "
                      "e.g. aggFilters=results:with")
  p.add_argument("--fields", default="", help="comma-separated API fields ('' = all)")
  p.add_argument("--page_size", type=int, default=100, help="1..1000")
  p.add_argument("--max_pages", type=int, default=0, help="pages this run (0 = to the end)")
  p.add_argument("--base_url", default=API_URL)
  p.add_argument("--min_interval_s", type=float, default=1.2)
  p.add_argument("--max_attempts", type=int, default=6)
  p.add_argument("--backoff_s", type=float, default=1.0)
  p.add_argument("--backoff_max_s", type=float, default=60.0)
  p.add_argument("--timeout_s", type=float, default=60.0)
  p.add_argument("--cache_dir", default="", help="'' -> <out>/.ctgov_api/cache")
  a = p.parse_args(argv)
  if not 1 <= a.page_size <= 1000:
    p.error(f"--page_size: {a.page_size} is not in 1..1000 (the API's limit)")
  params = [(k, v) for k, v in (("query.term", a.query), ("query.cond", a.cond),
                                ("query.intr", a.intr)) if v] + a.param
  if not params:
    p.error("no query: give --query, --cond, --intr or --param")
  query = Query(tuple(params), a.page_size, tuple(f for f in a.fields.split(",") if f))
  result = fetch_studies(query, a.out, base_url=a.base_url,
                         retry=Retry(a.max_attempts, a.backoff_s, a.backoff_max_s, a.timeout_s),
                         min_interval_s=a.min_interval_s, max_pages=a.max_pages,
                         cache_dir=a.cache_dir)
  skipped = result.report.skipped.get(SOURCE, {})
  print(f"ctgov_api: {result.pages_fetched} pages fetched, {result.pages_cached} from cache, "
        f"{result.studies_written} studies written to {a.out}"
        + (f", skipped {dict(skipped)}" if skipped else "")
        + ("; done" if result.done else "; more pages remain (run again to continue)"))
  return result


if __name__ == "__main__":
  main()
