"""bench/accelerator.py: the peak table, the parity figures against NumPy, and its reduced
CPU run end to end (the lines parse; no timing is asserted)."""
import math
import os
import re
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import accelerator  # noqa: E402

NUMBER = r"(-?[0-9.]+(?:e[-+]?\d+)?)"


@pytest.mark.parametrize("kind,tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA L4", 121), ("TPU v4", 275),
    ("TPU v5 lite", 197), ("TPU v5e", 197), ("TPU v5p", 459), ("TPU v5", 459),
    ("TPU v6 lite", 918), ("NVIDIA L40S", None), ("cpu", None),
])
def test_table_peak_by_device_kind(kind, tflops):
  want = None if tflops is None else tflops * 1e12
  assert accelerator.table_peak(kind) == want


def test_parity_stats_against_numpy():
  rng = np.random.default_rng(0)
  ref = rng.normal(size=(2, 5, 7)).astype(np.float32)
  got = ref + rng.normal(scale=0.3, size=ref.shape).astype(np.float32)
  s = {k: float(v) for k, v in accelerator.parity_stats(ref, got).items()}
  diff = np.abs(got - ref)
  np.testing.assert_allclose(s["max_diff"], diff.max(), rtol=1e-6)
  np.testing.assert_allclose(s["mean_diff"], diff.mean(), rtol=1e-6)
  np.testing.assert_allclose(s["max_ref"], np.abs(ref).max(), rtol=1e-6)
  assert s["agree"] == pytest.approx(np.mean(got.argmax(-1) == ref.argmax(-1)))


@pytest.mark.slow  # about 40 s on 2 loaded cores: it compiles each of the script's programs
def test_reduced_cpu_run_prints_five_parsable_lines(capsys):
  accelerator.main(["--preset=tiny", "--parity_len=32", "--batch=8", "--seq_len=32",
                    "--steps=1", "--batches=1", "--prompt=8", "--new=4", "--prompts=8",
                    "--group=2", "--grpo_prompt=8", "--grpo_new=4", "--grpo_steps=1",
                    "--matmul_n=128"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert [ln.split()[0] for ln in lines] == ["accelerator", "parity", "sampler", "sft", "grpo"]
  assert "REDUCED run, preset tiny" in lines[0]

  m = re.search(rf"max \|diff\| {NUMBER}, mean \|diff\| {NUMBER}, max \|f32 logit\| {NUMBER}, "
                rf"argmax agreement {NUMBER} of (\d+)", lines[1])
  max_diff, mean_diff, max_ref, agree = map(float, m.groups()[:4])
  assert all(math.isfinite(v) for v in (max_diff, mean_diff, max_ref, agree))
  assert 0 < mean_diff <= max_diff  # bf16 really ran: the logits differ
  assert max_diff <= 0.05 * max_ref and agree >= 0.95  # tighter than the script's 0.90: 2 layers
  assert lines[1].endswith("since start") and ": pass |" in lines[1]

  for line, pattern in ((lines[2], rf"B=1: {NUMBER} tok/s \(decode {NUMBER}\)"),
                        (lines[3], rf"\| {NUMBER} tokens/s, step {NUMBER} ms"),
                        (lines[3], rf"loss {NUMBER}"),
                        (lines[4], rf"\| {NUMBER} s/step = {NUMBER}% of the {NUMBER} s limit")):
    m = re.search(pattern, line)
    assert m, (pattern, line)
    assert all(math.isfinite(float(v)) for v in m.groups())
  assert "no table peak for 'cpu'" in lines[3]
  for stage in accelerator.STAGES:
    assert re.search(rf"{stage} {NUMBER} s \({NUMBER}% of the step", lines[4]), stage
