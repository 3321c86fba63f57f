"""Metrics: JSON lines, resume de-duplication, TensorBoard scalars read back, ETA line, NaN check."""
import json
import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from deepimagine_jax.metrics_log import (
    MetricsWriter, NonFiniteLossError, check_finite, format_duration, read_metrics)


class FakeClock:
  def __init__(self):
    self.t = 1000.0

  def __call__(self):
    return self.t


def read_tb_scalars(tb_dir):
  """(tag, step, value) from TFRecord event files, parsed by hand (no tensorboard package)."""
  out, purges = [], []
  for path in sorted(tb_dir.glob("events.out.tfevents.*")):
    buf = path.read_bytes()
    pos = 0
    while pos < len(buf):
      (n,) = struct.unpack("<Q", buf[pos:pos + 8])
      data = buf[pos + 12:pos + 12 + n]
      pos += 12 + n + 4
      ev = event_pb2.Event.FromString(data)
      if ev.HasField("session_log"):
        purges.append(ev.step)
      for v in ev.summary.value:
        out.append((v.tag, ev.step, v.simple_value))
  return out, purges


def test_jsonl_and_tensorboard(tmp_path):
  with MetricsWriter(tmp_path, total_steps=10, log_every=2) as w:
    w.write(1, {"loss": 2.5, "lr": jnp.float32(1e-4)})
    w.write(2, {"loss": np.float64(2.0), "lr": 2e-4})
    # Flushed per line: readable before close.
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
  recs = read_metrics(tmp_path)
  assert [(r["step"], r["loss"]) for r in recs] == [(1, 2.5), (2, 2.0)]
  assert recs[0]["lr"] == pytest.approx(1e-4, rel=1e-6)
  assert all(isinstance(r["time"], float) for r in recs)
  scalars, _ = read_tb_scalars(tmp_path / "tb")
  assert ("loss", 1, 2.5) in scalars and ("loss", 2, 2.0) in scalars
  assert any(t == "lr" and s == 2 and v == pytest.approx(2e-4) for t, s, v in scalars)


def test_resume_drops_steps_at_or_after_start(tmp_path):
  with MetricsWriter(tmp_path, total_steps=10) as w:
    for s in range(1, 6):
      w.write(s, {"loss": float(s)})
  # A crash mid-write leaves a torn last line.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "lo')
  # The checkpoint was at step 3, so the resumed run writes from step 4 again.
  with MetricsWriter(tmp_path, total_steps=10, start_step=4) as w:
    for s in range(4, 7):
      w.write(s, {"loss": 10.0 + s})
  recs = read_metrics(tmp_path)
  assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
  assert [r["loss"] for r in recs] == [1.0, 2.0, 3.0, 14.0, 15.0, 16.0]
  _, purges = read_tb_scalars(tmp_path / "tb")
  assert 4 in purges  # TensorBoard is told to hide the stale steps 4..5


def test_fresh_run_clears_old_file(tmp_path):
  with MetricsWriter(tmp_path, total_steps=3) as w:
    w.write(1, {"loss": 1.0})
  with MetricsWriter(tmp_path, total_steps=3) as w:
    w.write(1, {"loss": 7.0})
  assert [r["loss"] for r in read_metrics(tmp_path)] == [7.0]


def test_non_scalar_metric_is_rejected(tmp_path):
  with MetricsWriter(tmp_path, total_steps=3) as w:
    with pytest.raises(TypeError, match="'hist'"):
      w.write(1, {"hist": np.zeros(3)})


@pytest.mark.parametrize("secs,want", [
    (0, "0s"), (42.4, "42s"), (59.6, "1m00s"), (114, "1m54s"), (3600, "1h00m"),
    (2 * 3600 + 3 * 60 + 59, "2h03m"), (86400 * 3 + 4 * 3600, "3d04h"), (float("nan"), "?"),
    (-1, "?")])
def test_format_duration(secs, want):
  assert format_duration(secs) == want


def test_progress_line_eta(tmp_path):
  clock = FakeClock()
  w = MetricsWriter(tmp_path, total_steps=100, clock=clock)
  clock.t += 12 * 1.3  # 12 steps at 1.3 s/step
  line = w.progress_line(12, {"loss": 2.3456, "acc": 0.5})
  # 88 steps left * 1.3 s = 114.4 s
  assert line == "step 12/100 (12.0%) loss 2.346 acc 0.5 | 1.30 s/step ETA 1m54s"
  clock.t += 8 * 2.0  # slower window: the rate follows the latest interval
  line = w.progress_line(20, {"loss": 2.0})
  assert line.endswith("2.00 s/step ETA 2m40s")
  w.close()


def test_progress_line_before_any_timing(tmp_path):
  w = MetricsWriter(tmp_path, total_steps=4, start_step=0, clock=FakeClock())
  assert w.progress_line(0, {"loss": 1.0}) == "step 0/4 (0.0%) loss 1"
  w.close()


def test_check_finite():
  check_finite(3, {"loss": 1.0, "grad_norm": jnp.float32(2.0)})
  with pytest.raises(NonFiniteLossError, match=r"step 7: loss=nan"):
    check_finite(7, {"loss": float("nan"), "acc": 0.5})
  with pytest.raises(NonFiniteLossError, match=r"step 8: .*grad_norm=inf"):
    check_finite(8, {"loss": 1.0, "grad_norm": np.float32(np.inf)})
  # Restricting the keys ignores other metrics.
  check_finite(9, {"loss": 1.0, "kl": math.inf}, keys=["loss"])
  with pytest.raises(KeyError, match="'loss'"):
    check_finite(9, {"kl": 1.0}, keys=["loss"])


def test_read_metrics_skips_bad_lines(tmp_path):
  p = tmp_path / "m.jsonl"
  p.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\nnot json\n" + json.dumps({"loss": 2}) + "\n\n"
               + json.dumps({"step": 3, "loss": float("nan")}) + "\n")
  recs = read_metrics(p)
  assert [r["step"] for r in recs] == [1, 3]
  assert math.isnan(recs[1]["loss"])
