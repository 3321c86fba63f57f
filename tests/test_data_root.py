"""Where the data comes from: the documented order, and the embedded sample when offline."""
import hashlib
import logging

import pytest

from data_pipeline import data_root as dr


@pytest.fixture
def offline(monkeypatch, tmp_path):
  """No $DEEPIMAGINE_DATA, no ../shared/data, a cache in tmp_path, and a failing download."""
  monkeypatch.delenv(dr.ENV_VAR, raising=False)
  monkeypatch.setattr(dr, "SHARED", tmp_path / "no-shared")
  monkeypatch.setattr(dr, "CACHE_DIR", tmp_path / "cache")

  def no_network(dest):
    raise dr.DataRootError("no local data and the download of https://x failed (offline)")
  monkeypatch.setattr(dr, "download_ct_open", no_network)
  return tmp_path


def test_offline_falls_back_to_the_embedded_sample_and_says_so(offline, caplog):
  with caplog.at_level(logging.WARNING):
    root = dr.resolve_data_root(None)
  digest = hashlib.sha256(dr.EMBEDDED_ARCHIVE.read_bytes()).hexdigest()[:12]
  assert root == offline / "cache" / f"embedded-{digest}"
  assert len(list((root / "ctgov_xml").glob("*.xml"))) == 353
  assert len(list((root / "ctgov_json").glob("*.json"))) == 3
  assert not (root / "ct_open").exists()  # CT Open is never in the repo
  lines = [r.getMessage() for r in caplog.records if "embedded" in r.getMessage()]
  assert len(lines) == 1 and "not CT Open" in lines[0] and str(root) in lines[0]
  # unpacked once: a second call reuses it, and no staging folder is left behind
  assert dr.resolve_data_root(None) == root
  assert sorted(p.name for p in (offline / "cache").iterdir()) == [root.name]


def test_the_documented_order_and_clear_errors(offline, monkeypatch, tmp_path):
  with pytest.raises(dr.DataRootError, match="download of https://x failed"):
    dr.resolve_data_root(None, allow_embedded=False)
  with pytest.raises(dr.DataRootError, match="no data root"):
    dr.resolve_data_root(None, allow_download=False, allow_embedded=False)
  mine = tmp_path / "mine"
  mine.mkdir()
  monkeypatch.setenv(dr.ENV_VAR, str(mine))
  assert dr.resolve_data_root(None) == mine
  assert dr.resolve_data_root(str(offline)) == offline  # the config key comes first
  with pytest.raises(dr.DataRootError, match="--config.data.root"):
    dr.resolve_data_root(str(tmp_path / "nope"))
  monkeypatch.setenv(dr.ENV_VAR, str(tmp_path / "nope"))
  with pytest.raises(dr.DataRootError, match=dr.ENV_VAR):
    dr.resolve_data_root(None)
