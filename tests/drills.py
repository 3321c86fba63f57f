"""Drills through the real launcher, too slow for CI; prints one line of figures per drill.

  python tests/drills.py [--only kill,disk,damage,config,imagine] [--kills 3]

kill    SFT (tiny, a checkpoint every step) killed with SIGKILL while a save is in
        flight, `--kills` times, then rerun: the exported policy and every metric
        must be bit-identical to an uninterrupted run.
disk    a full disk (RLIMIT_FSIZE, as tests/disk_limit.py) during a checkpoint: the run
        must stop with one line naming the failed step, the earlier checkpoint intact
        and resumable.
damage  each kind of damage of tests/test_checkpoint.py to the newest checkpoint of a
        finished run, then a longer rerun: it must warn once, resume from the previous
        step, and end bit-identical to an undamaged run.
config  the bad values of issue 14: each must end the launcher with one line (no
        traceback) before the data build.
imagine configs/traces.py:imagine with the project's own endpoint as the teacher (a
        `mini` policy after 20 SFT steps on the tests' data root, served by
        configs/serve.py): every answer is validated and counted; run twice, the
        second run must send nothing (all from the cache).
The CI-sized versions are tests/test_checkpoint.py, test_loop.py, test_config.py, test_entry.py.
"""
import argparse
import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from test_checkpoint import DAMAGE  # noqa: E402
from test_entry import launch_env  # noqa: E402

METRICS = ("loss", "grad_norm", "target_tokens", "learning_rate")


def launch(workdir, *overrides, config="configs/sft.py:tiny", limit_bytes=None, wait=True):
  def preexec():
    if limit_bytes is not None:
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.RLIM_INFINITY))

  cmd = [sys.executable, str(REPO / "launch" / "main.py"), f"--config={REPO / config}",
         f"--workdir={workdir}", *overrides]
  proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(2), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, preexec_fn=preexec)
  if not wait:
    return proc
  out, err = proc.communicate(timeout=1800)
  return proc.returncode, out, err


def count_tracebacks(err: str) -> int:
  return err.count("Traceback (most recent call last)")


def metrics(workdir):
  rows = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
  return [(r["step"], *(r[k] for k in METRICS)) for r in rows]


def policy_bytes(workdir):
  return (pathlib.Path(workdir) / "policy" / "model.safetensors").read_bytes()


def same_run(a, b) -> bool:
  return metrics(a) == metrics(b) and policy_bytes(a) == policy_bytes(b)


def drill_kill(root, kills: int):
  steps = ["--config.sft.steps=12", "--config.sft.checkpoint_every=1"]
  rc, _, err = launch(root / "ref", *steps)
  assert rc == 0, err[-3000:]
  work = root / "killed"
  killed_in_save = 0
  for _ in range(kills):
    proc = launch(work, *steps, wait=False)
    ckpts = work / "checkpoints"
    while proc.poll() is None:
      if ckpts.is_dir() and any(".orbax-checkpoint-tmp" in p.name for p in ckpts.iterdir()):
        proc.send_signal(signal.SIGKILL)
        killed_in_save += 1
        break
      time.sleep(0.002)
    proc.communicate()
  rc, _, err = launch(work, *steps)
  assert rc == 0, err[-3000:]
  print(f"kill: {killed_in_save}/{kills} SIGKILLs with a save in flight; rerun "
        f"{'bit-identical' if same_run(root / 'ref', work) else 'DIFFERENT'} to the "
        f"uninterrupted run ({len(metrics(work))} metric steps, policy "
        f"{len(policy_bytes(work))} bytes)")


def drill_disk(root):
  work = root / "disk"
  rc, _, err = launch(work, "--config.sft.steps=2")  # the data build and step 2's checkpoint
  assert rc == 0, err[-3000:]
  size = max(p.stat().st_size for p in (work / "checkpoints" / "2").rglob("*") if p.is_file())
  rc, _, err = launch(work, "--config.sft.steps=6", "--config.sft.checkpoint_every=2",
                      limit_bytes=size // 2)
  errors = [l for l in err.splitlines() if l.startswith("error:")]
  tracebacks = count_tracebacks(err)
  steps_left = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
  rc2, _, err2 = launch(work, "--config.sft.steps=6", "--config.sft.checkpoint_every=2")
  print(f"disk: exit {rc}, {len(errors)} error line(s), {tracebacks} tracebacks, "
        f"{len(err.splitlines())} stderr lines in all; checkpoints left {steps_left}; "
        f"rerun with space: exit {rc2}, metric steps {[m[0] for m in metrics(work)]}")
  print(f"  {errors[0] if errors else err[-2000:]}")


def drill_damage(root):
  base = root / "damage_base"
  rc, _, err = launch(base, "--config.sft.steps=4", "--config.sft.checkpoint_every=2")
  assert rc == 0, err[-3000:]
  ref = root / "damage_ref"
  shutil.copytree(base, ref)
  rc, _, err = launch(ref, "--config.sft.steps=6", "--config.sft.checkpoint_every=2")
  assert rc == 0, err[-3000:]
  for kind, damage in DAMAGE.items():
    work = root / f"damage_{kind.replace(' ', '_').replace('/', '')}"
    shutil.copytree(base, work)
    damage(work / "checkpoints" / "4")
    rc, _, err = launch(work, "--config.sft.steps=6", "--config.sft.checkpoint_every=2")
    warnings = [l for l in err.splitlines() if "is damaged" in l]
    resumed = [l.split("] ")[-1] for l in err.splitlines() if "resumed from checkpoint" in l]
    print(f"damage: {kind:24s} exit {rc}, {len(warnings)} warning(s), {resumed}, "
          f"{count_tracebacks(err)} tracebacks, end "
          f"{'bit-identical' if rc == 0 and same_run(ref, work) else 'DIFFERENT'}")


BAD_CONFIGS = ("--config.sft.no_such_key=1", "--config.rl.group_size=0", "--config.sft.steps=-1",
               "--config.data.prompt_len=4096", "--config.model.preset=nope",
               "--config.data.root=/nonexistent", "--config.rl.reward_weights=garbage")


def drill_config(root):
  for flag in BAD_CONFIGS:
    work = root / "config"
    rc, _, err = launch(work, flag, config="configs/rl.py:tiny")
    lines = err.splitlines()
    print(f"config: {flag:36s} exit {rc}, {count_tracebacks(err)} tracebacks, "
          f"data build {'ran' if (work / 'data').exists() else 'not started'}; last line: "
          f"{lines[-1] if lines else ''}")
    shutil.rmtree(work, ignore_errors=True)


def drill_imagine(root):
  import collections
  import socket

  import httpx

  import data_files
  data = data_files.make_data_root(root / "imagine_data")
  common = [f"--config.data.root={data}"]
  rc, _, err = launch(root / "im_sft", *common, "--config.model.preset=mini",
                      "--config.sft.steps=20", "--config.sft.global_batch_size=8",
                      "--config.data.seq_len=448", "--config.data.prompt_len=448",
                      config="configs/sft.py")
  assert rc == 0, err[-3000:]
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  server = launch(root / "im_serve", f"--config.serve.checkpoint={root / 'im_sft'}",
                  f"--config.serve.port={port}", "--config.serve.prompt_len=448",
                  "--config.serve.max_new_tokens=64", config="configs/serve.py", wait=False)
  try:
    deadline = time.monotonic() + 300
    while True:
      try:
        httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).raise_for_status()
        break
      except httpx.HTTPError:
        if time.monotonic() > deadline or server.poll() is not None:
          raise SystemExit(f"imagine: the server did not come up:\n{server.stderr.read()[-3000:]}")
        time.sleep(1)
    os.environ.setdefault("OPENAI_API_KEY", "unused")  # the teacher reads the named variable
    for attempt in ("first", "rerun"):
      rc, _, err = launch(root / "im_run", *common,
                          f"--config.teacher.base_url=http://127.0.0.1:{port}/v1",
                          "--config.teacher.max_tokens=64", "--config.imagine.max_walks=16",
                          config="configs/traces.py:imagine")
      assert rc == 0, err[-3000:]
      report = json.loads((root / "im_run" / "imagined_report.json").read_text())
      t, rejected = report["teacher"], collections.Counter()
      for f in report["per_factor"].values():
        rejected.update(f["rejected"])
      print(f"imagine ({attempt}): walks {report['walked']}, requests {t['requests']}, sent "
            f"{t['sent_ok']}, from cache {t['cached']}, valid {report['examples']}, rejected "
            f"{sum(rejected.values())} {dict(rejected.most_common())}", flush=True)
  finally:
    server.terminate()
    server.communicate(timeout=60)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--only", default="kill,disk,damage,config,imagine")
  parser.add_argument("--kills", type=int, default=3)
  args = parser.parse_args()
  root = pathlib.Path(tempfile.mkdtemp(prefix="drills-"))
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / "jax_cache"))
  drills = {"kill": lambda: drill_kill(root, args.kills), "disk": lambda: drill_disk(root),
            "damage": lambda: drill_damage(root), "config": lambda: drill_config(root),
            "imagine": lambda: drill_imagine(root)}
  for name in args.only.split(","):
    t0 = time.time()
    drills[name]()
    print(f"  ({name}: {time.time() - t0:.0f} s)", flush=True)
  shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
