"""Where the trial data lives.

Order: an explicit setting (`--config.data.root`), the `DEEPIMAGINE_DATA`
environment variable, `../shared/data` beside the repository, a download of the public
CT Open pickles into a cache directory, else (offline) the embedded public-domain
ClinicalTrials.gov sample that ships with the repo (`data_pipeline/embedded/`), said in
one line: its evaluation questions are derived from the registry, not CT Open's.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared" / "data"
EMBEDDED_ARCHIVE = pathlib.Path(__file__).resolve().parent / "embedded" / "ctgov_sample.tar.xz"
ENV_VAR = "DEEPIMAGINE_DATA"
CACHE_DIR = pathlib.Path(
    os.environ.get("DEEPIMAGINE_CACHE", pathlib.Path.home() / ".cache" / "deepimagine"))

CT_OPEN_URL = ("https://raw.githubusercontent.com/ClinicalTrial-OpenChallenge/"
               "CT_Open/main/datasets/{name}")
CT_OPEN_FILES = ("Winter_2025.pickle", "Summer_2025.pickle")  # the benchmark: required
# CT Open's own training split in three parts (merged as one release): fetched when reachable
CT_OPEN_TRAIN_FILES = tuple(f"Train_2025_part{i}.pickle" for i in (1, 2, 3))


class DataRootError(RuntimeError):
  pass


def resolve_data_root(root: str | None, allow_download: bool = True,
                      allow_embedded: bool = True) -> pathlib.Path:
  """Returns the data root, trying the documented places in order."""
  if root:
    path = pathlib.Path(root).expanduser()
    if not path.is_dir():
      raise DataRootError(f"data root {path} (from --config.data.root) does not exist")
    return path
  if os.environ.get(ENV_VAR):
    path = pathlib.Path(os.environ[ENV_VAR]).expanduser()
    if not path.is_dir():
      raise DataRootError(f"data root {path} (from ${ENV_VAR}) does not exist")
    return path
  if SHARED.is_dir():
    return SHARED
  if allow_download:
    try:
      return download_ct_open(CACHE_DIR / "data")
    except DataRootError as e:
      if not allow_embedded:
        raise
      reason = str(e)
  elif not allow_embedded:
    raise DataRootError(
        f"no data root: set --config.data.root or ${ENV_VAR}, or place the data at {SHARED}")
  else:
    reason = "no data root set and downloads not allowed"
  path = embedded_root()
  msg = (f"data: CT Open not available ({reason.split(';')[0]}); using the embedded "
         f"public-domain ClinicalTrials.gov sample at {path} (evaluation questions are "
         f"derived from the registry, not CT Open's)")
  logging.warning(msg)
  return path


def embedded_root(cache_dir: pathlib.Path | None = None) -> pathlib.Path:
  """The embedded sample, unpacked once into `<cache>/embedded-<sha256[:12]>/`.

  Unpacked into a staging folder and renamed into place, so a killed unpack never
  leaves a half-filled root; members are extracted with tarfile's `data` filter
  (no links out, no absolute paths, no device files).
  """
  data = EMBEDDED_ARCHIVE.read_bytes()
  dest = (cache_dir or CACHE_DIR) / f"embedded-{hashlib.sha256(data).hexdigest()[:12]}"
  if dest.is_dir():
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=dest.parent))
  try:
    with tarfile.open(EMBEDDED_ARCHIVE, "r:xz") as tar:
      tar.extractall(staging, filter="data")
    os.chmod(staging, 0o755)
    try:
      os.rename(staging, dest)
    except OSError:  # another process unpacked it first: theirs is identical
      if not dest.is_dir():
        raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return dest


def download_ct_open(dest: pathlib.Path) -> pathlib.Path:
  """Downloads the public CT Open pickles; says clearly when offline. A training part
  that cannot be fetched is logged and left out (the build counts it as missing)."""
  target = dest / "ct_open"
  target.mkdir(parents=True, exist_ok=True)
  for name in CT_OPEN_FILES + CT_OPEN_TRAIN_FILES:
    out = target / name
    if out.exists():
      continue
    url = CT_OPEN_URL.format(name=name)
    logging.info("downloading %s -> %s", url, out)
    tmp = out.with_suffix(".part")
    try:
      with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
        f.write(r.read())
    except (urllib.error.URLError, OSError) as e:
      if name in CT_OPEN_TRAIN_FILES:
        tmp.unlink(missing_ok=True)
        logging.warning("CT Open training part %s not fetched (%s); building without it",
                        url, e)
        continue
      raise DataRootError(
          f"no local data and the download of {url} failed ({e}); this machine "
          f"may be offline. Set ${ENV_VAR} to a folder holding ct_open/*.pickle") from e
    os.replace(tmp, out)  # never leave a half-written pickle under the final name
  return dest
