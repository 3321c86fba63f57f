"""Entry tests: the real `launch/main.py` runs for a few steps (the program has a pulse)."""
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _launch(config: str, workdir: pathlib.Path, *overrides: str) -> str:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, str(REPO / "launch" / "main.py"), f"--config={REPO / config}",
         f"--workdir={workdir}", *overrides]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout + proc.stderr


def test_sft_tiny_three_steps(tmp_path):
  log = _launch("configs/sft.py:tiny", tmp_path)
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert all(r["loss"] > 0 for r in rows)
  assert (tmp_path / "checkpoints" / "3").is_dir()
  assert (tmp_path / "policy" / "config.json").exists()
  assert "step 3/3" in log


def test_unknown_config_key_fails(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, str(REPO / "launch" / "main.py"), f"--config={REPO}/configs/sft.py:tiny",
       f"--workdir={tmp_path}", "--config.sft.no_such_key=1"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "no_such_key" in proc.stderr


def test_rl_tiny_end_to_end(tmp_path):
  _launch("configs/rl.py:tiny", tmp_path)
  assert [json.loads(l)["step"] for l in open(tmp_path / "rl" / "metrics.jsonl")] == [1, 2, 3]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert "model_score" in summary
  for name in ("metrics.json", "report.md", "trajectories.html"):
    assert (tmp_path / "report" / name).exists(), name
