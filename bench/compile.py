"""Compile seconds of the SFT train step and the sampler against depth, per layer layout.

  python bench/compile.py                          # from the repo root: 4, 16, 36 layers
  python bench/compile.py --layouts=scan --depths=4,36

Prints one line. The model is the `mini` shape (d_model 128) at each depth, in the
scanned layout (cfg.scan_layers: stacked layers under lax.scan) and the unrolled one.
"Compile" is what JAX reports through jax.monitoring for the first call: tracing to a
jaxpr, lowering to MLIR and the backend compile, summed over every program that call
compiles (the train step: `sft.make_jitted_step`, AdamW, one device; the sampler:
`sampler.sample`'s prefill, decode loop and finish, 2 prompts x 2 samples, 16 prompt
tokens, 8 new). Ratios are each depth's seconds over the 4-layer (first) depth's, from
the same run. Load averages before and after: the cores may be shared.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from deepimagine_jax import model as model_lib  # noqa: E402
from deepimagine_jax import sampler  # noqa: E402
from deepimagine_jax import sft  # noqa: E402
from deepimagine_jax import sharding  # noqa: E402
from deepimagine_jax import train_state  # noqa: E402
from deepimagine_jax.config import ModelConfig  # noqa: E402

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


class CompileClock:
  """Sums the compile durations JAX reports while it is on."""

  def __init__(self):
    self.on, self.seconds = False, 0.0
    jax.monitoring.register_event_duration_secs_listener(self._record)

  def _record(self, event, secs, **_):
    if self.on and event in _COMPILE_EVENTS:
      self.seconds += secs

  def measure(self, fn) -> float:
    """Compile seconds of fn()'s programs; fn's results are waited for."""
    self.on, self.seconds = True, 0.0
    try:
      jax.block_until_ready(fn())
    finally:
      self.on = False
    return self.seconds


def train_step_compile(cfg: ModelConfig, mesh, clock: CompileClock, batch=4, seq=64) -> float:
  graphdef, params = train_state.init_params(cfg, mesh, 0)
  tx = optax.adamw(1e-3)
  state, state_sh = train_state.state_from_params(params, tx, mesh, 0)
  rs = np.random.RandomState(0)
  tok = rs.randint(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  batch_sh = sharding.batch_sharding(mesh)
  host = {"inputs": tok[:, :-1], "targets": tok[:, 1:],
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)),
          "segment_ids": np.ones((batch, seq), np.int32),
          "loss_mask": np.ones((batch, seq), np.float32)}
  data = {k: jax.device_put(np.ascontiguousarray(v), batch_sh) for k, v in host.items()}
  step = sft.make_jitted_step(graphdef, tx, 1, state_sh, batch_sh)
  with jax.set_mesh(mesh):
    return clock.measure(lambda: step(state, data, None)[1]["loss"])


def sampler_compile(cfg: ModelConfig, clock: CompileClock, prompts=2, group=2, prompt_len=16,
                    new_tokens=8) -> float:
  graphdef, params = nnx.split(model_lib.Transformer(cfg, nnx.Rngs(0)))
  tok = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (prompts, prompt_len)),
                    jnp.int32)
  mask = jnp.ones((prompts, prompt_len), bool)
  return clock.measure(lambda: sampler.sample(graphdef, params, tok, mask, jax.random.key(0),
                                              max_new_tokens=new_tokens, group_size=group).tokens)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--depths", default="4,16,36")
  ap.add_argument("--layouts", default="scan,unrolled")
  args = ap.parse_args()
  depths = [int(d) for d in args.depths.split(",")]
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  clock = CompileClock()
  load0 = os.getloadavg()[0]
  parts = []
  for layout in args.layouts.split(","):
    if layout not in ("scan", "unrolled"):
      raise SystemExit(f"--layouts: 'scan' and/or 'unrolled', got {layout!r}")
    for what in ("train", "sampler"):
      secs = []
      for n in depths:
        cfg = ModelConfig.mini().replace(n_layers=n, scan_layers=layout == "scan")
        secs.append(train_step_compile(cfg, mesh, clock) if what == "train"
                    else sampler_compile(cfg, clock))
      figures = " ".join(f"{n}L {s:.2f}" for n, s in zip(depths, secs))
      ratios = " ".join(f"{n}/{depths[0]} {s / secs[0]:.2f}x" for n, s in zip(depths[1:], secs[1:]))
      parts.append(f"{layout} {what}: {figures} ({ratios})")
  print(f"compile s, d_model 128 ({jax.devices()[0].platform}, load {load0:.1f} -> "
        f"{os.getloadavg()[0]:.1f}) | " + " | ".join(parts))


if __name__ == "__main__":
  main()
