"""Orbax CheckpointManager wrapper: train state, data-iterator state and metadata per step.

One checkpoint step is a directory `<directory>/<step>/` holding four items:
  state      a pytree of jax.Arrays (model params, optimizer state, step, RNG key) via
             StandardSave, so sharded arrays are written per shard and restored straight
             into the shardings of the abstract tree the caller passes;
  data       every process's data iterator state (Grain `iterator.get_state()`), as JSON,
             in process order; `bytes` anywhere inside are stored as
             {"__bytes_b64__": "..."} and come back as bytes;
  meta       a small JSON dict (config, git hash, ...) for humans and for checks on resume;
  checksums  two 32-bit sums per state leaf over its bits, computed on device at save
             and compared after restore: Orbax's OCDBT/zarr files carry no checksum
             of their own, and a flipped byte inside an array's chunk loads silently.

Typed PRNG keys (`jax.random.key`) in the state are saved as their raw `key_data`
(uint32) and wrapped back on restore when the abstract tree holds a typed-key leaf,
so callers can keep typed keys in their state.

Atomicity: Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it on
commit; `latest_step()` only sees committed steps, so a crash mid-save leaves the
previous checkpoint as the latest. Leftover temp directories are removed when the
next Checkpointer opens the directory.

Damage: `restore_latest` tries the steps newest first. A step that fails to restore
(a missing or truncated file, bad JSON, a checksum that does not match) is named in
one warning; the next older one is tried, and once one restores the damaged newer
steps are deleted so the resumed run can write them again. When every step is
damaged it raises CheckpointDamagedError rather than silently starting afresh.

Saves are asynchronous: `save` returns once device arrays are copied to host. A save
that fails in the background (a full disk) is raised as one CheckpointSaveError by
`check()` (non-blocking, called by the loop every step), the next `save`, or `wait()`;
the earlier checkpoints stay intact. Call `wait()` before reading the files and
`close()` before the process exits.

Multi-process: every process calls `save` / `restore` (Orbax writes each process's
shards; JSON items are written by process 0, after the data states are gathered).
"""
import base64
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

_B64 = "__bytes_b64__"
_ITEMS = ("state", "data", "meta", "checksums")
_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


class CheckpointError(RuntimeError):
  """A checkpoint problem that ends the run; its message is the one line a user sees."""


class CheckpointSaveError(CheckpointError):
  """A save failed (e.g. a full disk); the checkpoints before it are intact."""


class CheckpointDamagedError(CheckpointError):
  """A checkpoint that cannot be restored as written (or every checkpoint, in restore_latest)."""


class CheckpointMismatchError(CheckpointError):
  """An intact checkpoint this run cannot resume (another number of processes, or a state
  of another structure: a changed model shape or layer layout)."""


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


def _leaf_checksum(x):
  """(sum of words, sum of word * (2i + 1)) mod 2**32 over the leaf's raw bits.

  Words are the elements' bit patterns widened to uint32 (bool as 0 / 1); i is the
  flat (C order) index of the word. Any single flipped bit changes the second sum
  (its weight is odd), a swap of two unequal words too. Elementwise, then summed,
  so it runs sharded without gathering the array.
  """
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  else:
    words = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
  index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(words.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, d) * jnp.uint32(stride)
    stride = stride * words.shape[d] % 2**32
  return jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                    jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)])


_tree_sums = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def tree_checksums(tree) -> dict[str, list[int]]:
  """{leaf path: [sum, weighted sum]} of a pytree of arrays (typed keys as key data).

  One jitted call per set of devices the leaves live on (a jit takes one set).
  """
  flat = jax.tree_util.tree_flatten_with_path(_keys_to_data(tree))[0]
  groups: dict[Any, list[int]] = {}
  for i, (_, x) in enumerate(flat):
    sharding = getattr(x, "sharding", None)
    groups.setdefault(None if sharding is None else frozenset(sharding.device_set), []).append(i)
  out = {}
  for idx in groups.values():
    sums = jax.device_get(_tree_sums([flat[i][1] for i in idx]))
    for i, value in zip(idx, sums):
      out[jax.tree_util.keystr(flat[i][0])] = [int(v) for v in value]
  return out


def _gather_json(obj) -> list:
  """Every process's JSON-able `obj`, in process order (one element on one process)."""
  if jax.process_count() == 1:
    return [obj]
  blob = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(blob.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(bytes(rows[i, :n]).decode("utf-8")) for i, n in enumerate(sizes)]


def _all_processes_ok(ok: bool) -> bool:
  """True when `ok` holds on every process, so they fall back to the same step."""
  if jax.process_count() == 1:
    return ok
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(ok))).min())


def _one_line(e: BaseException) -> str:
  return f"{type(e).__name__}: {' '.join(str(e).split())}"


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints, saving every `save_every` steps."""

  def __init__(self, directory, *, max_to_keep: int, save_every: int, async_save: bool = True):
    if max_to_keep < 1 or save_every < 1:
      raise ValueError(f"Checkpointer: max_to_keep ({max_to_keep}) and save_every ({save_every}) must be >= 1")
    self.directory = epath.Path(directory).absolute()
    self.save_every = save_every
    self._saving = None  # the step of the save in flight
    self._failed = False  # a failed save was raised already
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
    Whether its files are intact shows only on restore (`restore_latest`).
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
    at a step the periodic save already wrote is harmless. `data_state` is this
    process's; all processes call `save` together.
    """
    step = int(step)
    # Orbax's default policy also saves the first step it sees; we want the plain grid.
    if not force and step % self.save_every != 0:
      return False
    if step in self._mgr.all_steps():
      logging.info("checkpoint: step %d already saved in %s; skipping", step, self.directory)
      return False
    self.check()
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(_keys_to_data(state)),
        data=ocp.args.JsonSave({"per_process": _gather_json(_encode_json(data_state))}),
        meta=ocp.args.JsonSave(_encode_json(meta or {})),
        checksums=ocp.args.JsonSave({"leaves": tree_checksums(state)}),
    )
    try:
      saved = self._mgr.save(step, args=args, force=True)
    except Exception as e:  # the previous save's failure surfaces here too
      raise self._save_failed(self._saving or step, e) from e
    if saved:
      self._saving = step
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return bool(saved)

  def _save_failed(self, step: int, e: Exception) -> CheckpointSaveError:
    self._saving, self._failed = None, True
    return CheckpointSaveError(
        f"checkpoint: saving step {step} to {self.directory} failed ({_one_line(e)}); "
        f"the run stops here; the checkpoints before it are intact: steps {self.all_steps()}")

  def check(self):
    """Raises CheckpointSaveError if the save in flight has failed; never waits for one."""
    if self._saving is not None and not self._mgr.is_saving_in_progress():
      self.wait()

  def restore(self, step: int | None, abstract_state) -> tuple[Any, Any, dict]:
    """Returns (state, data_state, meta) of `step` (None: the latest).

    `abstract_state` is a pytree of jax.ShapeDtypeStruct carrying shardings (see
    `abstract_state(...)` or `jax.eval_shape` + the trainer's shardings); arrays come
    back with exactly those shapes, dtypes and shardings, their checksums verified
    (CheckpointDamagedError names the first leaf that differs). `data_state` is this
    process's.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"checkpoint: no committed checkpoint in {self.directory}")
    if step not in self._mgr.all_steps():
      raise FileNotFoundError(
          f"checkpoint: step {step} not in {self.directory} (have {self.all_steps()})")
    stored = jax.tree.map(lambda s: _abstract_key_data(s) if _is_typed_key(s) else s, abstract_state)
    saved_leaves = set(self._mgr.restore(step, args=ocp.args.Composite(
        checksums=ocp.args.JsonRestore())).checksums["leaves"])
    want = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(stored)[0]}
    if saved_leaves != want:
      only_saved, only_run = sorted(saved_leaves - want), sorted(want - saved_leaves)
      raise CheckpointMismatchError(
          f"checkpoint: {self.directory}/{step} holds a state of another structure than this "
          f"run's ({len(only_saved)} leaves only in the checkpoint, e.g. {only_saved[:2]}; "
          f"{len(only_run)} only in the run, e.g. {only_run[:2]}): the model shape or layer "
          f"layout changed (model.preset, model.scan_layers, lora.*); resume with the config "
          f"it was written with, or start in a new workdir")
    out = self._mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(stored),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
        checksums=ocp.args.JsonRestore(),
    ))
    saved, read = out.checksums["leaves"], tree_checksums(out.state)
    for leaf in sorted(set(saved) | set(read)):
      if saved.get(leaf) != read.get(leaf):
        raise CheckpointDamagedError(
            f"checkpoint: {self.directory}/{step} state{leaf} does not match its checksum "
            f"(saved {saved.get(leaf)}, read {read.get(leaf)})")
    per_process = out.data["per_process"]
    if len(per_process) != jax.process_count():
      raise CheckpointMismatchError(
          f"checkpoint: {self.directory}/{step} was written by {len(per_process)} processes, "
          f"this run has {jax.process_count()}: each process's data position cannot be resumed")
    state = jax.tree.map(
        lambda a, x: jax.random.wrap_key_data(x, impl=_key_impl(a)) if _is_typed_key(a) else x,
        abstract_state, out.state)
    return state, _decode_json(per_process[jax.process_index()]), _decode_json(out.meta)

  def restore_latest(self, abstract_state) -> tuple[int, Any, Any, dict] | None:
    """(step, state, data_state, meta) of the newest intact checkpoint; None when there is none.

    A damaged newer step is named in one warning and skipped; once an older one
    restores, the damaged ones are deleted (the resumed run writes them again).
    """
    damaged = []
    for step in sorted(self._mgr.all_steps(), reverse=True):
      error = None
      try:
        if not self._is_complete(step):
          raise CheckpointDamagedError(f"a step folder without all of {_ITEMS}")
        restored = self.restore(step, abstract_state)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # any damage: missing/truncated files, bad JSON, checksums
        error = e
      if _all_processes_ok(error is None):
        for bad in damaged:
          self._mgr.delete(bad)
        if damaged:
          logging.warning("checkpoint: resuming from step %d; deleted the damaged steps %s",
                          step, damaged)
        return (step, *restored)
      logging.warning("checkpoint: %s/%d is damaged (%s); falling back to the previous one",
                      self.directory, step, _one_line(error) if error else "on another process")
      damaged.append(step)
    if damaged:
      raise CheckpointDamagedError(
          f"checkpoint: every checkpoint in {self.directory} is damaged (steps {damaged}, "
          "see the warnings above); move the folder away to start afresh")
    return None

  def wait(self):
    """Blocks until the save in flight is committed; a failed one is a CheckpointSaveError."""
    step = self._saving
    try:
      self._mgr.wait_until_finished()
    except Exception as e:
      raise self._save_failed(step, e) from e
    self._saving = None

  def close(self, *, raise_errors: bool = True):
    """Waits for the save in flight and releases Orbax's threads.

    A failed save raises here unless it was raised already, or `raise_errors` is
    False (the caller is already ending on another error; it is logged then).
    """
    try:
      if not self._failed:
        self.wait()
    except CheckpointSaveError as e:
      if raise_errors:
        raise
      logging.error("%s", e)
    finally:
      try:
        self._mgr.close()
      except Exception as e:  # the failure above, raised once already
        logging.info("checkpoint: closing after a failed save: %s", _one_line(e))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close(raise_errors=exc[0] is None)
