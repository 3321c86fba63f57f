"""io: atomic writes, JSON lines, JSON-ready values, folder swaps."""
import dataclasses
import json
import math
import os

import numpy as np
import pytest

from data_pipeline import io
from data_pipeline.build_report import BuildReport


def test_to_jsonable():
  @dataclasses.dataclass(frozen=True)
  class R:
    x: tuple
  value = {"a": np.float32(0.5), "b": np.arange(3), "c": (1, 2), "d": math.nan,
           "e": R((np.int64(4),)), "f": [np.bool_(True), -math.inf]}
  out = io.to_jsonable(value)
  assert out == {"a": 0.5, "b": [0, 1, 2], "c": [1, 2], "d": None, "e": {"x": [4]},
                 "f": [True, None]}
  json.dumps(out, allow_nan=False)
  with pytest.raises(TypeError, match="object"):
    io.to_jsonable(object())


def test_jsonl_round_trip_and_bad_lines(tmp_path):
  rows = [{"id": "ü", "v": (1, 2)}, {"id": "b", "v": np.int32(3)}]
  path = io.write_jsonl(tmp_path / "x.jsonl", rows)
  assert io.read_jsonl(path) == [{"id": "ü", "v": [1, 2]}, {"id": "b", "v": 3}]
  with open(path, "a", encoding="utf-8") as f:
    f.write("\n{cut\n")
  with pytest.raises(ValueError, match="x.jsonl:4"):
    io.read_jsonl(path)
  report = BuildReport()
  assert len(io.read_jsonl(path, report, "t")) == 2 and report.n_skipped("t", "bad_json") == 1


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
  path = io.atomic_write(tmp_path / "f.txt", "old")
  with pytest.raises(TypeError):  # the write fails after the temporary file exists
    io.atomic_write(path, object())
  assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_swap_in_replaces_a_folder(tmp_path):
  dest, staging = tmp_path / "build", tmp_path / "staging"
  for d, text in ((dest, "old"), (staging, "new")):
    d.mkdir()
    (d / "x").write_text(text)
  io.swap_in(staging, dest)
  assert (dest / "x").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["build"]


def test_recover_swap_after_kills(tmp_path):
  """What SIGKILLs leave: a dead writer's staging folder, and (killed between swap_in's two
  renames) no dest but the old build beside it. A live writer's folders are left alone."""
  import subprocess
  dead = subprocess.Popen(["true"])
  dead.wait()
  dest = tmp_path / "data"
  old = tmp_path / f".data.old-{dead.pid}-ab12"
  old.mkdir()
  (old / "fingerprint.json").write_text("{}")
  (tmp_path / f".data.staging-{dead.pid}-x1").mkdir()
  (tmp_path / ".data.staging-x2").mkdir()  # no pid: an older run's
  live = tmp_path / f".data.staging-{os.getppid()}-x3"
  live.mkdir()
  done = io.recover_swap(dest)
  assert (dest / "fingerprint.json").read_text() == "{}" and len(done) == 3
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data", live.name])
  assert io.recover_swap(dest) == []  # nothing more to do
  assert io.staging_prefix(dest) == f".data.staging-{os.getpid()}-"


def test_dataclass_record_writes_the_json_of_to_jsonable():
  @dataclasses.dataclass(frozen=True)
  class Inner:
    name: str
    values: tuple[int, ...]

  @dataclasses.dataclass(frozen=True)
  class Outer:
    id: str
    n: int
    words: tuple[str, ...]
    inner: Inner | None
    inners: tuple[Inner, ...]
    score: float | None
    loose: tuple

  x = Outer("ü", 3, ("a", "b"), Inner("i", (1, 2)), (Inner("j", ()),), math.nan,
            (np.int64(4),))
  assert json.dumps(io.dataclass_record(x), sort_keys=True, ensure_ascii=False) == json.dumps(
      io.to_jsonable(x), sort_keys=True, ensure_ascii=False)
  assert io.dataclass_record(x)["score"] is None and io.dataclass_record(x)["loose"] == [4]
