"""Orbax CheckpointManager wrapper: train state, data-iterator state and metadata per step.

One checkpoint step is a directory `<directory>/<step>/` holding three items:
  state  a pytree of jax.Arrays (model params, optimizer state, step, RNG key) via
         StandardSave, so sharded arrays are written per shard and restored straight
         into the shardings of the abstract tree the caller passes;
  data   the data iterator's state (Grain `iterator.get_state()`), as JSON; `bytes`
         anywhere inside it are stored as {"__bytes_b64__": "..."} and come back as bytes;
  meta   a small JSON dict (config, git hash, ...) for humans and for checks on resume.

Typed PRNG keys (`jax.random.key`) in the state are saved as their raw `key_data`
(uint32) and wrapped back on restore when the abstract tree holds a typed-key leaf,
so callers can keep typed keys in their state.

Atomicity: Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it on
commit; `latest_step()` only sees committed steps, so a crash mid-save leaves the
previous checkpoint as the latest. Leftover temp directories are removed when the
next Checkpointer opens the directory. A step directory missing one of the three
items (e.g. a half-finished copy) is skipped by `latest_step()` too.

Saves are asynchronous: `save` returns once device arrays are copied to host; call
`wait()` before reading the files and `close()` before the process exits.

Multi-process: JSON items are written by the primary process, so `data` holds process
0's iterator state.
"""
import base64
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

_B64 = "__bytes_b64__"
_ITEMS = ("state", "data", "meta")


def _encode_json(x):
  """JSON-safe copy of x: bytes -> {"__bytes_b64__": str}, tuples -> lists."""
  if isinstance(x, (bytes, bytearray)):
    return {_B64: base64.b64encode(bytes(x)).decode("ascii")}
  if isinstance(x, dict):
    for k in x:
      if not isinstance(k, str):
        raise TypeError(f"checkpoint data/meta: dict keys must be str, got {k!r} ({type(k).__name__})")
    return {k: _encode_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_encode_json(v) for v in x]
  return x


def _decode_json(x):
  if isinstance(x, dict):
    if set(x) == {_B64}:
      return base64.b64decode(x[_B64])
    return {k: _decode_json(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_decode_json(v) for v in x]
  return x


def _is_typed_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)


def _key_impl(sds):
  """PRNG impl of an abstract typed key, read by tracing (no private attributes)."""
  found = []

  def probe(k):
    found.append(jax.random.key_impl(k))
    return k

  jax.eval_shape(probe, jax.ShapeDtypeStruct(sds.shape, sds.dtype))
  return found[0]


def _abstract_key_data(sds):
  """Abstract uint32 key_data for an abstract typed key, keeping its sharding."""
  data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(sds.shape, sds.dtype))
  sharding = getattr(sds, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    extra = data.ndim - len(sds.shape)
    spec = tuple(sharding.spec) + (None,) * (len(sds.shape) - len(sharding.spec) + extra)
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
  return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


def abstract_state(tree):
  """ShapeDtypeStructs (with the arrays' shardings) for `restore`, from a live state tree."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints, saving every `save_every` steps."""

  def __init__(self, directory, *, max_to_keep: int, save_every: int, async_save: bool = True):
    if max_to_keep < 1 or save_every < 1:
      raise ValueError(f"Checkpointer: max_to_keep ({max_to_keep}) and save_every ({save_every}) must be >= 1")
    self.directory = epath.Path(directory).absolute()
    self.save_every = save_every
    self._mgr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=1,  # the save_every grid is applied in `save`
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        ),
    )

  def _is_complete(self, step: int) -> bool:
    return all((self.directory / str(step) / item).exists() for item in _ITEMS)

  def latest_step(self) -> int | None:
    """Newest committed step that holds all items; None when there is none.

    Orbax already hides its uncommitted temp directories; the item check also skips
    a step directory that was created or copied by something else and is incomplete.
    """
    for step in sorted(self._mgr.all_steps(), reverse=True):
      if self._is_complete(step):
        return step
      logging.warning("checkpoint: %s/%d lacks one of %s; ignoring it", self.directory, step, _ITEMS)
    return None

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def save(self, step: int, state, data_state: Any = None, meta: dict | None = None,
           force: bool = False) -> bool:
    """Saves if `step` is on the save_every grid (or `force`); True when a save started.

    A step that already has a checkpoint is skipped (False), so a final forced save
    at a step the periodic save already wrote is harmless.
    """
    step = int(step)
    # Orbax's default policy also saves the first step it sees; we want the plain grid.
    if not force and step % self.save_every != 0:
      return False
    if step in self._mgr.all_steps():
      logging.info("checkpoint: step %d already saved in %s; skipping", step, self.directory)
      return False
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(_keys_to_data(state)),
        data=ocp.args.JsonSave({"data_state": _encode_json(data_state)}),
        meta=ocp.args.JsonSave(_encode_json(meta or {})),
    )
    saved = self._mgr.save(step, args=args, force=True)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return bool(saved)

  def restore(self, step: int | None, abstract_state) -> tuple[Any, Any, dict]:
    """Returns (state, data_state, meta) of `step` (None: the latest).

    `abstract_state` is a pytree of jax.ShapeDtypeStruct carrying shardings (see
    `abstract_state(...)` or `jax.eval_shape` + the trainer's shardings); arrays come
    back with exactly those shapes, dtypes and shardings.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"checkpoint: no committed checkpoint in {self.directory}")
    if step not in self._mgr.all_steps():
      raise FileNotFoundError(
          f"checkpoint: step {step} not in {self.directory} (have {self.all_steps()})")
    stored = jax.tree.map(lambda s: _abstract_key_data(s) if _is_typed_key(s) else s, abstract_state)
    out = self._mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(stored),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
    ))
    state = jax.tree.map(
        lambda a, x: jax.random.wrap_key_data(x, impl=_key_impl(a)) if _is_typed_key(a) else x,
        abstract_state, out.state)
    return state, _decode_json(out.data["data_state"]), _decode_json(out.meta)

  def wait(self):
    """Blocks until pending async saves are committed; re-raises a failed save's error."""
    self._mgr.wait_until_finished()

  def close(self):
    self._mgr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
