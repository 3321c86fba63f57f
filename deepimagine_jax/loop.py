"""The one training loop, shared by SFT and GRPO.

It owns what both trainers need around their step: resume (train state and the
data iterator's position from the newest checkpoint), the step range, metrics
read one step late (step N is dispatched before step N-1's metrics are read),
the NaN/Inf check on those metrics, the metrics writer, and checkpoints on the
`checkpoint_every` grid and at the last step. A checkpoint is never written for
a step whose metrics have not been checked. A killed run rerun with the same
arguments ends where an uninterrupted run would, bit for bit; a damaged newest
checkpoint is skipped for the previous intact one (checkpoint.restore_latest), and
a save that fails in the background (a full disk) stops the run at the next step
with checkpoint.CheckpointSaveError.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Mapping

import jax
from absl import logging

from deepimagine_jax import checkpoint as ckpt_lib
from deepimagine_jax import metrics_log
from deepimagine_jax.config import LoopConfig

# (state, step number, host batch) -> (new state, metrics: device arrays or floats)
StepFn = Callable[[Any, int, Any], tuple[Any, Mapping[str, Any]]]
# (step, metrics as floats, seconds since the previous step ended) -> metrics to write
Summarize = Callable[[int, dict, float], dict]


def run(cfg: LoopConfig, workdir: str, mesh, state, data: Iterator, step_fn: StepFn, *,
        summarize: Summarize, finite_keys=("loss", "grad_norm"), meta: dict | None = None,
        stop_after: int | None = None):
  """Runs `step_fn` from the state's step (or the newest checkpoint) to `cfg.steps`.

  `data` is a checkpointable iterator (get_state / set_state) of host-local
  batches; `meta` goes into every checkpoint. `stop_after` ends the run early at
  that step without a final save, as if the process had been killed (for tests).
  Returns the final state.
  """
  ckpt = ckpt_lib.Checkpointer(f"{workdir}/checkpoints", max_to_keep=cfg.keep_checkpoints,
                               save_every=cfg.checkpoint_every)
  writer = None
  finished = False
  try:
    state = _resume(ckpt, state, data, cfg.resume)
    start = int(state.step)
    writer = metrics_log.MetricsWriter(workdir, cfg.steps, start_step=start + 1,
                                       log_every=cfg.log_every)

    def finish(step, metrics, seconds):
      metrics = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
      metrics_log.check_finite(step, metrics, keys=finite_keys)
      writer.write(step, summarize(step, metrics, seconds))

    pending = None  # (step, metrics, seconds) of the previous step, read one step late
    t_last = time.perf_counter()
    with jax.set_mesh(mesh):
      for step in range(start + 1, cfg.steps + 1):
        if stop_after is not None and step > stop_after:
          break
        state, metrics = step_fn(state, step, next(data))
        ckpt.check()  # a save that failed in the background stops the run here
        if pending is not None:
          finish(*pending)
        now = time.perf_counter()
        pending = (step, metrics, now - t_last)
        t_last = now
        if step % ckpt.save_every == 0 or step == cfg.steps:
          finish(*pending)  # never save a state whose metrics we have not checked
          pending = None
          ckpt.save(step, state, data_state=data.get_state(), meta=meta, force=True)
      if pending is not None:
        finish(*pending)
    ckpt.wait()  # the last save is committed, or its failure raised
    finished = True
  finally:
    ckpt.close(raise_errors=finished)  # on another error, a failed save is only logged
    if writer is not None:
      writer.close()
  return state


def _resume(ckpt: ckpt_lib.Checkpointer, state, data, resume: bool):
  """The newest intact checkpoint's state (in `state`'s shardings) and data position."""
  restored = ckpt.restore_latest(ckpt_lib.abstract_state(state)) if resume else None
  if restored is None:
    return state
  step, state, data_state, _ = restored
  if data_state is not None:
    data.set_state(data_state)
  logging.info("resumed from checkpoint step %d", step)
  return state
