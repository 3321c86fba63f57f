"""Memory plan before a run: per-device bytes of a job config, and whether they fit.

  python bench/memory.py --config=configs/rl.py:recipe --devices=8
  python bench/memory.py --config=configs/rl.py --devices=8 --config.model.preset=qwen3_8b \\
      --config.lora.rank=64 --config.mesh.fsdp=8 --config.model.dtype=bfloat16 ...

Nothing is allocated: on `--devices` fake CPU devices (set before JAX starts) the
model, adapters and optimizer state are `jax.eval_shape`d and placed by the
project's own sharding rules (sharding.state_shardings, train_state's optimizer
shardings), so parameter and optimizer bytes are each device's shard sizes. The
KV cache is the GRPO rollout's: each prompt's prompt_len slots once (read by all
group_size samples of it) and prompts_per_step x group_size rows of max_new_tokens
slots per layer, sharded as the sampler shards it (sampler.cache_spec). GRPO with
beta > 0 and no LoRA also holds its reference, a copy of the policy's parameters
(with LoRA the reference is the base with adapters off: nothing more). Activations
are the temporary bytes of the compiled SFT step and GRPO update
(`compiled.memory_analysis()`, XLA's buffer assignment for one device of the
SPMD program; on the CPU backend, so an estimate of what an accelerator
assigns). With remat the plan compiles the scanned layout (the same function, tests
check): XLA:CPU schedules the unrolled layout's recomputation early, so its buffer
assignment showed no remat saving at all (small, 16 x 400 tokens: 33 MB per layer without
remat, 31 MB with it unrolled, 4 MB scanned, which is the layer's input plus its weight
gradients). `--probe_layers=a,b` compiles a- and b-layer copies of the model and
extrapolates the temporaries linearly to all layers (unrolled big models compile slowly
on CPU); 0 (the default) compiles the whole model, which the scanned layout (presets of
26+ layers, and any plan with remat) does in minutes. Extrapolating the scanned layout
from few layers is unreliable: XLA's buffer assignment for 2 vs 4 scanned layers of
qwen3_8b on 16 devices gave a negative slope. A plan fits an accelerator when its peak
(the largest of the three phases) is at most 90% of its memory (headroom for the
runtime and fragmentation). A preset model keeps the preset's vocabulary (a
checkpoint's); --config.model.hf_checkpoint reads config.json.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # fake devices, before JAX is imported
  _n = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")), "8")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={_n}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from deepimagine_jax import hf_import  # noqa: E402
from deepimagine_jax import lora  # noqa: E402
from deepimagine_jax import model as model_lib  # noqa: E402
from deepimagine_jax import rl  # noqa: E402
from deepimagine_jax import sampler  # noqa: E402
from deepimagine_jax import sft  # noqa: E402
from deepimagine_jax import sharding  # noqa: E402
from deepimagine_jax import train_state  # noqa: E402
from deepimagine_jax.config import ModelConfig, RunConfig  # noqa: E402
from deepimagine_jax.optimizer import make_optimizer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Job config file.", lock_config=True)
flags.DEFINE_integer("devices", 8, "Fake devices the mesh spans (the accelerators).")
flags.DEFINE_string("probe_layers", "0", "'a,b': extrapolate activations from a- and b-layer "
                    "compiles; '0': compile the whole model.")
flags.DEFINE_string("hbm", "16,80,141", "Accelerator memories (GiB) to check the plan against.")
flags.DEFINE_string("json_out", "", "Also write the plan here as JSON.")
FLAGS = flags.FLAGS
GiB = 2 ** 30
HEADROOM = 0.9


def model_config(run: RunConfig) -> ModelConfig:
  m = run.model
  if m.hf_checkpoint:
    with open(os.path.join(m.hf_checkpoint, "config.json")) as f:
      cfg = hf_import.config_from_hf(json.load(f))
  else:
    cfg = getattr(ModelConfig, m.preset)()
  layout = {} if m.scan_layers is None else {"scan_layers": m.scan_layers}
  if m.remat:  # see the module docstring: XLA:CPU hoists the unrolled layout's recompute
    layout["scan_layers"] = True
  return cfg.replace(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, **layout)


def device_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
  return total


def _with_sharding(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def abstract_params(cfg: ModelConfig, run: RunConfig, mesh):
  """(graphdef, trainable, frozen) as sharded ShapeDtypeStructs: nothing allocated."""
  model = nnx.eval_shape(lambda: model_lib.Transformer(cfg, nnx.Rngs(0), lora=run.lora))
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state,
                       sharding.state_shardings(state, mesh))
  trainable, frozen = lora.partition(state)
  return graphdef, trainable, frozen


def optimizer_state(trainable, opt_cfg, mesh):
  tx, _ = make_optimizer(opt_cfg)
  abstract = jax.eval_shape(tx.init, trainable)
  param_sh = jax.tree.map(lambda x: x.sharding, trainable)
  sh = train_state.opt_state_shardings(abstract, trainable, param_sh, mesh)
  return tx, _with_sharding(abstract, sh)


def kv_cache_bytes(cfg: ModelConfig, run: RunConfig, mesh) -> int:
  """The rollout's cache (sampler: a model.SharedPrefixCache): the Q prompts' P slots once,
  read by all G rows of a prompt, and the B = Q x G rows' own C new slots."""
  r = run.rl
  item = jnp.dtype(r.cache_dtype).itemsize
  total = 0
  for rows, slots in ((r.prompts_per_step * r.group_size, r.max_new_tokens),
                      (r.prompts_per_step, run.data.prompt_len)):
    spec = sampler.cache_spec(cfg.n_kv_heads, rows, mesh)
    div = (mesh.shape["data"] * mesh.shape["fsdp"] if spec[0] else 1) * (
        mesh.shape["tensor"] if spec[2] else 1)
    total += 2 * cfg.n_layers * rows * slots * cfg.n_kv_heads * cfg.head_dim * item // div
  return total


def _state(trainable, opt, mesh):
  rep = sharding.replicated(mesh)
  return train_state.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params=trainable, opt_state=opt,
      rng=jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep))


def _shardings(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def step_temp_bytes(cfg: ModelConfig, run: RunConfig, mesh) -> dict:
  """Temporary bytes per device of the compiled SFT step and GRPO update (one device)."""
  graphdef, trainable, frozen = abstract_params(cfg, run, mesh)
  out = {}
  rows = sharding.batch_sharding(mesh)
  if run.sft is not None:
    tx, opt = optimizer_state(trainable, run.sft.optimizer, mesh)
    state = _state(trainable, opt, mesh)
    B, T = run.sft.global_batch_size, run.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32 if k != "loss_mask" else jnp.float32,
                                     sharding=rows) for k in sft.BATCH_KEYS}
    step = sft.make_jitted_step(graphdef, tx, run.sft.optimizer.grad_accum_steps,
                                _shardings(state), _shardings(batch), _shardings(frozen))
    with jax.set_mesh(mesh):
      out["sft"] = step.lower(state, batch, frozen).compile().memory_analysis().temp_size_in_bytes
  if run.rl is not None:
    r = run.rl
    tx, opt = optimizer_state(trainable, r.optimizer, mesh)
    state = _state(trainable, opt, mesh)
    Q, P, G, C = r.prompts_per_step, run.data.prompt_len, r.group_size, r.max_new_tokens
    shapes = {"prompt_tokens": ((Q, P), jnp.int32), "prompt_mask": ((Q, P), jnp.int32),
              "completions": ((Q * G, C), jnp.int32), "old_logprobs": ((Q * G, C), jnp.float32),
              "advantages": ((Q * G,), jnp.float32), "completion_mask": ((Q * G, C), jnp.float32),
              "ref_logprobs": ((Q * G, C), jnp.float32)}
    batch = {k: jax.ShapeDtypeStruct(s, d, sharding=sharding.batch_sharding(mesh, len(s)))
             for k, (s, d) in shapes.items()}
    update = jax.jit(functools.partial(rl.rl_update, graphdef=graphdef, tx=tx, cfg=r),
                     in_shardings=(_shardings(state), _shardings(batch), _shardings(frozen)),
                     out_shardings=(_shardings(state), None), donate_argnums=0)
    with jax.set_mesh(mesh):
      out["rl_update"] = update.lower(state, batch, frozen).compile().memory_analysis(
      ).temp_size_in_bytes
  return out


def reference_bytes(run: RunConfig, trainable) -> int:
  """GRPO with a KL term keeps a frozen copy of the policy as its reference (rl.GRPOTrainer),
  except with LoRA, where the reference is the base with the adapters off: no copy."""
  full_copy = run.rl is not None and run.rl.beta > 0 and not (run.lora and run.lora.rank)
  return device_bytes(trainable) if full_copy else 0


def plan(run: RunConfig, mesh, probe_layers: tuple[int, int] | None) -> dict:
  cfg = model_config(run)
  _, trainable, frozen = abstract_params(cfg, run, mesh)
  out = {"model": run.model.hf_checkpoint or run.model.preset, "devices": mesh.size,
         "mesh": dict(mesh.shape), "lora_rank": run.lora.rank if run.lora else 0,
         "params_frozen": device_bytes(frozen), "params_trained": device_bytes(trainable)}
  opt_cfg = (run.sft or run.rl).optimizer
  out["optimizer"] = device_bytes(optimizer_state(trainable, opt_cfg, mesh)[1])
  out["kv_cache"] = kv_cache_bytes(cfg, run, mesh) if run.rl is not None else 0
  out["params_reference"] = reference_bytes(run, trainable)
  if probe_layers is None:
    temps = step_temp_bytes(cfg, run, mesh)
  else:  # linear in layers: remat keeps one residual per layer, the rest is per-layer work
    a, b = probe_layers
    small = [step_temp_bytes(_layers(cfg, n), run, mesh) for n in (a, b)]
    temps = {k: int(small[0][k] + (small[1][k] - small[0][k]) * (cfg.n_layers - a) / (b - a))
             for k in small[0]}
    out["activations_extrapolated_from_layers"] = [a, b]
  out.update({f"activations_{k}": v for k, v in temps.items()})
  resident = out["params_frozen"] + out["params_trained"] + out["optimizer"]
  phases = {k: resident + v for k, v in temps.items()}
  if "rl_update" in phases:  # the GRPO update reads its reference's log-probs
    phases["rl_update"] += out["params_reference"]
  if run.rl is not None:
    phases["rl_rollout"] = resident + out["params_reference"] + out["kv_cache"]
  out["peak_phase"], out["peak"] = max(phases.items(), key=lambda kv: kv[1])
  return out


def _layers(cfg: ModelConfig, n: int) -> ModelConfig:
  types = cfg.layer_types[:n] if cfg.layer_types else ()
  return dataclasses.replace(cfg, n_layers=n, layer_types=types)


def table(p: dict, hbm_gib) -> str:
  rows = [("parameters, frozen base", p["params_frozen"]),
          ("parameters, trained", p["params_trained"]),
          ("parameters, GRPO reference copy", p["params_reference"]),
          ("optimizer state", p["optimizer"]),
          ("KV cache (GRPO rollout)", p["kv_cache"])]
  rows += [(f"activations, {k[len('activations_'):]} (temporaries)", v) for k, v in p.items()
           if k.startswith("activations_") and isinstance(v, int)]
  rows.append((f"peak ({p['peak_phase']})", p["peak"]))
  lines = [f"{p['model']}, LoRA rank {p['lora_rank']}, {p['devices']} devices {p['mesh']}",
           f"{'per device':40s} {'GiB':>8s}"]
  lines += [f"{name:40s} {v / GiB:8.2f}" for name, v in rows]
  lines.append("fits (peak <= 90%): " + ", ".join(
      f"{g:g} GiB {'yes' if p['peak'] <= HEADROOM * g * GiB else 'NO'}" for g in hbm_gib))
  return "\n".join(lines)


def main(argv):
  del argv
  if jax.device_count() != FLAGS.devices:
    raise SystemExit(f"error: --devices={FLAGS.devices} but JAX sees {jax.device_count()}")
  run = RunConfig.from_config(_CONFIG.value)
  mesh = sharding.mesh_from_config(run.mesh)
  probe = tuple(int(x) for x in FLAGS.probe_layers.split(",")) if FLAGS.probe_layers != "0" \
      else None
  if probe is not None and (len(probe) != 2 or not 0 < probe[0] < probe[1]):
    raise SystemExit(f"error: --probe_layers={FLAGS.probe_layers}: 'a,b' with 0 < a < b, or 0")
  p = plan(run, mesh, probe)
  hbm = [float(x) for x in FLAGS.hbm.split(",")]
  p["fits_gib"] = {str(g): p["peak"] <= HEADROOM * g * GiB for g in hbm}
  print(table(p, hbm))
  if FLAGS.json_out:
    pathlib.Path(FLAGS.json_out).write_text(json.dumps(p, indent=1) + "\n")


if __name__ == "__main__":
  app.run(main)
