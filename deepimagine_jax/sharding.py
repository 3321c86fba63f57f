"""One sharding story: logical axis names -> mesh axes `data`, `fsdp`, `tensor`.

Parameters carry `logical_axes` metadata (model.py). `RULES` maps each logical
name to a mesh axis (or None = replicated). The mesh uses Auto axis types, so
XLA propagates shardings through the computation; activations are pinned to
the batch axes at block boundaries by `constrain_activation`.

Several hosts: `initialize_hosts` (launch/main.py, before any other JAX call) takes
the coordinator, process count and id from `config.mesh`, else the environment;
`primary_first` lets process 0 write shared files (the data build) before the rest.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from deepimagine_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Read when config.mesh leaves them unset ("" / -1); JAX reads the first itself too.
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"

RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),  # the scanned layout's stacked layer axis: each device holds every layer
    ("lora_rank", "fsdp"),  # an adapter's rank axis, where its other axes leave fsdp free
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 meaning "the rest"."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into mesh {sizes}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} "
                     f"devices, have {len(devices)}")
  return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def mesh_from_config(mesh_cfg) -> jax.sharding.Mesh:
  """Builds the mesh from `config.mesh` (multi-host JAX is initialised by launch/main.py).

  Sizes that do not fit the machine's devices are a ConfigError naming the keys,
  raised before the data build.
  """
  try:
    mesh = make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
  except ValueError as e:
    raise ConfigError(f"config.mesh.data/fsdp/tensor={mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor}: "
                      f"must multiply to the {jax.device_count()} devices (one may be -1): {e}") from e
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size,
               jax.process_count())
  return mesh


def distributed_args(mesh_cfg: MeshConfig, environ: Mapping[str, str]) -> dict:
  """jax.distributed.initialize's arguments: the config's, else the environment's.

  Unset ones stay None, so JAX detects them (Cloud TPU, SLURM, Open MPI, Kubernetes)."""
  def env_int(name):
    value = environ.get(name, "")
    if value and not value.isdigit():
      raise ConfigError(f"${name}={value!r}: must be an integer >= 0")
    return int(value) if value else None

  return {
      "coordinator_address": mesh_cfg.coordinator_address or environ.get(COORDINATOR_ENV) or None,
      "num_processes": mesh_cfg.num_processes if mesh_cfg.num_processes >= 1
                       else env_int(NUM_PROCESSES_ENV),
      "process_id": mesh_cfg.process_id if mesh_cfg.process_id >= 0 else env_int(PROCESS_ID_ENV),
  }


def split_cpu_host(n: int) -> None:
  """Makes XLA's CPU platform n devices ($XLA_FLAGS' device count replaced); a no-op for
  n = 0. Call before any JAX computation: XLA reads the flag when its CPU client starts.
  Accelerators are unaffected (their devices are the chips)."""
  if n == 0:
    return
  try:  # JAX's private API (0.10); without it the flag is set and the check skipped
    from jax._src import xla_bridge
    started = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    started = False
  if started:
    raise RuntimeError("mesh.host_devices: JAX's backends already started; set it before "
                       "any JAX computation (launch/main.py does)")
  os.environ["XLA_FLAGS"] = with_host_devices(os.environ.get("XLA_FLAGS", ""), n)


def with_host_devices(xla_flags: str, n: int) -> str:
  """`xla_flags` with its CPU device count (if any) replaced by n."""
  flags = [f for f in xla_flags.split()
           if not f.startswith("--xla_force_host_platform_device_count=")]
  return " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])


def initialize_hosts(mesh_cfg: MeshConfig) -> None:
  """jax.distributed.initialize(), before any other JAX call (launch/main.py).

  CPU processes talk over gloo (tests run 2 processes on 127.0.0.1); accelerators
  ignore that setting.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**distributed_args(mesh_cfg, os.environ))


def primary_first(fn: Callable[[], Any], what: str) -> Any:
  """fn() on process 0, then on the others once it is done (they reuse its files).

  For work that writes shared files (the data build): processes that shared a
  folder would write it at once. Hosts without a shared folder each redo it, alike.
  """
  if jax.process_count() == 1:
    return fn()
  out = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f"primary_first: {what}")
  return out if jax.process_index() == 0 else fn()


def logical_to_spec(axes: Sequence[str | None] | None,
                    rules=RULES, mesh: jax.sharding.Mesh | None = None) -> P:
  """Maps logical axis names to a PartitionSpec (unknown names are an error). A mesh axis
  already taken by an earlier dimension leaves the later one replicated (a LoRA A of
  [E, embed, lora_rank] shards embed over fsdp, a B of [E, lora_rank, mlp] its rank)."""
  if axes is None:
    return P()
  table = dict(rules)
  out = []
  for name in axes:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis {name!r} has no sharding rule")
    out.append(None if table[name] is not None and table[name] in out else table[name])
  return P(*out)


def _spec_fits(spec: P, shape, mesh) -> P:
  """Drops mesh axes that do not divide the dimension (e.g. 2 kv heads on 4 shards)."""
  fixed = []
  for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axis is not None and dim % mesh.shape[axis]:
      logging.warning("dimension %d not divisible by mesh axis %s=%d: replicating it",
                      dim, axis, mesh.shape[axis])
      axis = None
    fixed.append(axis)
  return P(*fixed)


def state_shardings(abstract_state, mesh, rules=RULES):
  """NamedSharding for every Variable in an (abstract) nnx.State."""

  def one(v):
    if isinstance(v, nnx.Variable):
      meta = v.get_metadata()
      spec = logical_to_spec(meta.get("logical_axes"), rules)
      return v.replace(NamedSharding(mesh, _spec_fits(spec, v.shape, mesh)))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(make_module: Callable[[], nnx.Module], mesh, rules=RULES) -> nnx.Module:
  """Creates a module whose parameters are born sharded (never whole on one device)."""
  abstract = nnx.eval_shape(make_module)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules)

  def init():
    return nnx.split(make_module())[1]

  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
  """Batch arrays: leading dim over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def on_params_mesh(params):
  """`with` context: the mesh `params` live on, for work outside a training loop (scoring,
  sampling, embedding), so jitted calls shard their batch over it. Under no mesh, XLA
  computes the whole batch on every device the parameters are replicated over: N times the
  work on N devices (the tests' 8 fake CPU devices made evaluation 12x slower). A mesh already
  set, or parameters on one device, leave things as they are."""
  if not jax.sharding.get_abstract_mesh().empty:
    return contextlib.nullcontext()
  leaf = next(iter(jax.tree.leaves(params)), None)
  mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
  if not isinstance(mesh, jax.sharding.Mesh) or mesh.size == 1:
    return contextlib.nullcontext()
  return jax.set_mesh(mesh)


def host_array(x) -> np.ndarray:
  """Every element of a jax.Array as NumPy on this host, in global order (a batch sharded over
  several hosts' devices is gathered from all of them)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def constrain_activation(x):
  """Pins the batch dimension of an activation to (data, fsdp) under a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if x.shape[0] % n:
    return x
  return jax.lax.with_sharding_constraint(x, P(BATCH_AXES, *([None] * (x.ndim - 1))))
