"""Entry tests: the real `launch/main.py` runs for a few steps (the program has a pulse)."""
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def launch_env(devices: int, *, optimized: bool = False) -> dict:
  """The launcher's environment: this checkout's packages first (not another editable
  install's), `devices` CPU devices, the session's other XLA flags (tests/conftest.py),
  less its fast-compile ones when `optimized` (a child that runs more than it compiles)."""
  from conftest import FAST_COMPILE_FLAGS
  from deepimagine_jax import sharding
  drop = FAST_COMPILE_FLAGS if optimized else ()
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if f not in drop)
  return dict(os.environ, XLA_FLAGS=sharding.with_host_devices(flags, devices),
              JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                  [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH", "")] if p]))


def _launch(config: str, workdir: pathlib.Path, *overrides: str, ok: bool = True):
  cmd = [sys.executable, str(REPO / "launch" / "main.py"), f"--config={REPO / config}",
         f"--workdir={workdir}", *overrides]
  proc = subprocess.run(cmd, cwd=REPO, env=launch_env(2), capture_output=True, text=True,
                        timeout=900)
  if not ok:
    return proc
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout + proc.stderr


def test_sft_tiny_three_steps(tmp_path):
  # mesh.host_devices splits the CPU into 4 devices (launch_env asked for 2).
  log = _launch("configs/sft.py:tiny", tmp_path, "--config.mesh.host_devices=4")
  assert "4 devices (cpu) over 1 processes" in log
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert all(r["loss"] > 0 for r in rows)
  assert (tmp_path / "checkpoints" / "3").is_dir()
  assert (tmp_path / "policy" / "config.json").exists()
  assert "step 3/3" in log


def test_unknown_config_key_is_one_line(tmp_path):
  proc = _launch("configs/sft.py:tiny", tmp_path, "--config.sft.no_such_key=1", ok=False)
  assert proc.returncode == 1
  assert proc.stderr.splitlines() == [
      "error: --config.sft.no_such_key: the config declares no such key (every key is "
      "declared once, in configs/)"]


def test_bad_config_value_is_one_line_before_any_work(tmp_path):
  proc = _launch("configs/rl.py:tiny", tmp_path, "--config.rl.group_size=0", ok=False)
  assert proc.returncode == 1
  # The last line, after the INFO log of the devices and the resolved config; no traceback.
  assert proc.stderr.splitlines()[-1] == (
      "error: config.rl.group_size=0: must be an integer >= 2 (GRPO's advantage compares "
      "the samples of a prompt)"), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "data").exists()  # stopped before the data build


def test_rl_tiny_end_to_end(tmp_path):
  _launch("configs/rl.py:tiny", tmp_path)
  assert [json.loads(l)["step"] for l in open(tmp_path / "rl" / "metrics.jsonl")] == [1, 2, 3]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert "model_score" in summary
  for name in ("metrics.json", "report.md", "trajectories.html"):
    assert (tmp_path / "report" / name).exists(), name
