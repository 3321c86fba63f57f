"""Checkpointer: exact round trips (sharded, optax state, typed keys, JSON items),
retention, save interval, that a crashed or partial save never hides the last good step,
that every kind of damage to the newest step falls back to the previous one (checksums
against plain NumPy), and that a full disk is one error with the earlier steps intact."""
import json
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import disk_limit
import typed_configs
from deepimagine_jax.checkpoint import (CheckpointDamagedError, CheckpointMismatchError,
                                        Checkpointer, CheckpointSaveError, abstract_state,
                                        tree_checksums)
from deepimagine_jax.optimizer import make_optimizer


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _train_state(mesh, seed=0):
  """Params sharded on the mesh + an AdamW state after one update + step + typed key."""
  rng = np.random.default_rng(seed)
  params = {
      "w_DF": jax.device_put(rng.normal(size=(8, 4)).astype(np.float32),
                             NamedSharding(mesh, P("fsdp", "tensor"))),
      "emb_VD": jax.device_put(rng.normal(size=(6, 8)).astype(jnp.bfloat16),
                               NamedSharding(mesh, P(None, ("data", "fsdp")))),
      "scale_D": jax.device_put(rng.normal(size=(8,)).astype(np.float32), NamedSharding(mesh, P())),
  }
  tx = optax.adamw(1e-2)
  opt = tx.init(params)
  grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.5, params)
  _, opt = tx.update(grads, opt, params)
  key = jax.device_put(jax.random.key(seed), NamedSharding(mesh, P()))
  return {"params": params, "opt": opt, "step": jnp.asarray(seed + 7, jnp.int32), "rng": key}


def _assert_same(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert jax.dtypes.issubdtype(y.dtype, jax.dtypes.prng_key)
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (x.sharding, y.sharding)


def test_round_trip_sharded_optax_key_and_json(tmp_path, mesh):
  state = _train_state(mesh)
  data_state = {"next_index": 123, "blob": b"\x00\xffgrain", "nested": [{"b": b"xy"}, 3.5]}
  meta = {"config": {"lr": 1e-3}, "git": "abc"}
  with Checkpointer(tmp_path / "ck", max_to_keep=3, save_every=1) as ck:
    assert ck.latest_step() is None
    assert ck.save(7, state, data_state, meta)
    ck.wait()
    assert ck.latest_step() == 7
  # A fresh Checkpointer (a resumed process) restores into the abstract shardings.
  with Checkpointer(tmp_path / "ck", max_to_keep=3, save_every=1) as ck:
    got, got_data, got_meta = ck.restore(None, abstract_state(state))
  _assert_same(state, got)
  assert got["params"]["w_DF"].sharding.spec == P("fsdp", "tensor")
  assert got_data == {"next_index": 123, "blob": b"\x00\xffgrain", "nested": [{"b": b"xy"}, 3.5]}
  assert got_meta == meta
  # The RNG key works as a key after the round trip.
  np.testing.assert_array_equal(np.asarray(jax.random.normal(got["rng"], (3,))),
                                np.asarray(jax.random.normal(state["rng"], (3,))))


def test_restore_into_other_sharding(tmp_path, mesh):
  state = _train_state(mesh)
  with Checkpointer(tmp_path, max_to_keep=1, save_every=1) as ck:
    ck.save(1, state, None, None)
    ck.wait()
    target = abstract_state(state)
    new_sh = NamedSharding(mesh, P("tensor", None))
    target["params"]["w_DF"] = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=new_sh)
    got, data, meta = ck.restore(1, target)
  assert got["params"]["w_DF"].sharding == new_sh
  np.testing.assert_array_equal(np.asarray(got["params"]["w_DF"]), np.asarray(state["params"]["w_DF"]))
  assert data is None and meta == {}


def _nnx_train_state(seed):
  """What the trainers hold: nnx params + the project's masked AdamW state after one update."""
  model = nnx.Linear(3, 5, rngs=nnx.Rngs(seed))
  params = nnx.state(model, nnx.Param)
  tx, _ = make_optimizer(typed_configs.optimizer(10, learning_rate=1e-2, warmup_steps=0))
  opt = tx.init(params)
  _, opt = tx.update(jax.tree.map(jnp.ones_like, params), opt, params)
  return model, {"params": params, "opt": opt, "step": jnp.asarray(1), "rng": jax.random.key(seed)}


def test_nnx_state_and_masked_adamw_round_trip(tmp_path):
  model, state = _nnx_train_state(1)
  with Checkpointer(tmp_path, max_to_keep=1, save_every=1) as ck:
    ck.save(2, state, None, None)
    ck.wait()
    _, fresh = _nnx_train_state(9)
    got, _, _ = ck.restore(2, abstract_state(fresh))
  assert isinstance(got["params"], nnx.State)
  nnx.update(model, got["params"])  # structure fits the model
  _assert_same(state, got)


def test_keep_last_k_and_save_every(tmp_path):
  state = {"x": jnp.arange(4.0)}
  with Checkpointer(tmp_path, max_to_keep=2, save_every=3) as ck:
    saved = [s for s in range(1, 11) if ck.save(s, {"x": state["x"] + s}, {"s": s}, None)]
    ck.wait()
    assert saved == [3, 6, 9]
    assert ck.all_steps() == [6, 9]
    assert ck.latest_step() == 9
    assert ck.save(10, state, None, None, force=True)  # off-grid final save
    ck.wait()
    assert ck.all_steps() == [9, 10]
    assert not ck.save(10, state, None, None, force=True)  # already there: skipped
    got, data, _ = ck.restore(9, abstract_state(state))
  np.testing.assert_array_equal(np.asarray(got["x"]), np.arange(4.0) + 9)
  assert data == {"s": 9}
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["10", "9"]


def test_restore_missing_step_names_directory(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=1, save_every=1) as ck:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
      ck.restore(None, {"x": jax.ShapeDtypeStruct((2,), jnp.float32)})


def test_partial_save_dir_is_ignored(tmp_path):
  state = {"x": jnp.arange(3.0)}
  with Checkpointer(tmp_path, max_to_keep=3, save_every=1) as ck:
    ck.save(1, state, {"pos": 1}, None)
    ck.wait()
  # What a process killed mid-save leaves behind: Orbax's uncommitted temp directory.
  tmp = tmp_path / "2.orbax-checkpoint-tmp-1700000000"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "junk").write_bytes(b"half written")
  with Checkpointer(tmp_path, max_to_keep=3, save_every=1) as ck:
    assert ck.latest_step() == 1
    got, data, _ = ck.restore(None, abstract_state(state))
    np.testing.assert_array_equal(np.asarray(got["x"]), np.arange(3.0))
    assert data == {"pos": 1}
    # The run goes on and can save step 2 for real.
    assert ck.save(2, {"x": state["x"] * 2}, {"pos": 2}, None)
    ck.wait()
    assert ck.all_steps() == [1, 2]
  assert not tmp.exists()


def test_incomplete_step_dir_is_skipped(tmp_path):
  state = {"x": jnp.arange(3.0)}
  with Checkpointer(tmp_path, max_to_keep=3, save_every=1) as ck:
    ck.save(1, state, {"pos": 1}, None)
    ck.wait()
  # A final-looking step directory without all items (say, an interrupted copy).
  (tmp_path / "3" / "state").mkdir(parents=True)
  with Checkpointer(tmp_path, max_to_keep=3, save_every=1) as ck:
    assert ck.latest_step() == 1
    got, data, _ = ck.restore(None, abstract_state(state))
  np.testing.assert_array_equal(np.asarray(got["x"]), np.arange(3.0))
  assert data == {"pos": 1}


def test_failed_save_keeps_previous_checkpoint(tmp_path):
  good = {"x": jnp.arange(3.0)}
  with Checkpointer(tmp_path, max_to_keep=1, save_every=1) as ck:
    ck.save(1, good, {"pos": 1}, {"ok": True})
    ck.wait()
    # A save that raises while writing (a leaf Orbax cannot serialise). With
    # max_to_keep=1 a successful step 2 would delete step 1; a failed one must not.
    with pytest.raises(Exception):
      ck.save(2, {"x": object()}, {"pos": 2}, None)
      ck.wait()
  with Checkpointer(tmp_path, max_to_keep=1, save_every=1) as ck:
    assert ck.latest_step() == 1
    got, data, meta = ck.restore(None, abstract_state(good))
  np.testing.assert_array_equal(np.asarray(got["x"]), np.arange(3.0))
  assert data == {"pos": 1} and meta == {"ok": True}


def test_nan_state_is_saved_as_is(tmp_path):
  # NaN is data, not a failure: the trainer decides not to save a diverged state.
  state = {"x": jnp.array([1.0, jnp.nan, jnp.inf])}
  with Checkpointer(tmp_path, max_to_keep=1, save_every=1) as ck:
    assert ck.save(1, state, None, None)
    ck.wait()
    got, _, _ = ck.restore(1, abstract_state(state))
  np.testing.assert_array_equal(np.asarray(got["x"]), np.asarray(state["x"]))


def test_non_json_data_state_fails_clearly(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=1, save_every=1) as ck:
    with pytest.raises(TypeError, match="dict keys must be str"):
      ck.save(1, {"x": jnp.zeros(2)}, {1: "a"}, None)


# Checksums and damage --------------------------------------------------------------------

def _np_checksum(x: np.ndarray) -> list[int]:
  """The checksum in plain NumPy: words = the raw bits as uint, weights 2i + 1 (C order)."""
  x = np.ascontiguousarray(x)
  words = (x.astype(np.uint64) if x.dtype == np.bool_
           else x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.itemsize]).astype(np.uint64))
  words = words.reshape(-1)
  weights = (2 * np.arange(words.size, dtype=np.uint64) + 1) % 2**32
  return [int(words.sum() % 2**32), int(((words * weights) % 2**32).sum() % 2**32)]


def test_checksums_equal_numpy(mesh):
  rng = np.random.default_rng(3)
  leaves = {
      "f32": rng.normal(size=(4, 6)).astype(np.float32),
      "bf16": rng.normal(size=(8, 2)).astype(jnp.bfloat16),
      "i8": rng.integers(-128, 127, size=(3, 5, 2)).astype(np.int8),
      "u32": rng.integers(0, 2**32, size=(7,), dtype=np.uint64).astype(np.uint32),
      "flags": rng.random(9) > 0.5,
      "scalar": np.float32(-2.5),
  }
  tree = {k: jnp.asarray(v) for k, v in leaves.items()}
  tree["sharded"] = jax.device_put(leaves["f32"], NamedSharding(mesh, P("data", "tensor")))
  got = tree_checksums(tree)
  for k, v in leaves.items():
    assert got[f"['{k}']"] == _np_checksum(v), k
  assert got["['sharded']"] == _np_checksum(leaves["f32"])
  # One flipped bit anywhere changes it; so does swapping two unequal elements.
  flipped = leaves["f32"].copy()
  flipped.view(np.uint32)[2, 3] ^= 1 << 17
  swapped = leaves["f32"].copy()
  swapped[0, 0], swapped[0, 1] = swapped[0, 1], swapped[0, 0]
  sums = tree_checksums({"a": jnp.asarray(flipped), "b": jnp.asarray(swapped)})
  assert sums["['a']"] != got["['f32']"] and sums["['b']"] != got["['f32']"]


def _random_state(seed):
  """Incompressible values, so damage to any byte of an array file lands in the data."""
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(64, 128)).astype(np.float32)),
          "b": jnp.asarray(rng.normal(size=(128,)).astype(np.float32)),
          "rng": jax.random.key(seed)}


def _array_files(step_dir):
  return sorted((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
                key=lambda p: p.stat().st_size)


def _truncate(path, keep=0.5):
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])


def _flip(path, n_bytes):
  data = bytearray(path.read_bytes())
  mid = len(data) // 2
  for i in range(mid, mid + n_bytes):
    data[i] ^= 0xFF if n_bytes > 1 else 0x01
  path.write_bytes(bytes(data))


DAMAGE = {  # what a crash, a bad disk or a careless copy does to a finished step
    "truncated array file": lambda d: _truncate(_array_files(d)[-1]),
    "empty array file": lambda d: _truncate(_array_files(d)[-1], 0.0),
    "deleted array files": lambda d: [p.unlink() for p in _array_files(d)],
    "deleted state manifest": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "deleted state/": lambda d: shutil.rmtree(d / "state"),
    "deleted iterator state": lambda d: (d / "data" / "metadata").unlink(),
    "truncated iterator state": lambda d: _truncate(d / "data" / "metadata"),
    "deleted meta": lambda d: (d / "meta" / "metadata").unlink(),
    "deleted checksums": lambda d: (d / "checksums" / "metadata").unlink(),
    "64 flipped bytes": lambda d: _flip(_array_files(d)[-1], 64),
    "1 flipped bit": lambda d: _flip(_array_files(d)[-1], 1),
}


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
  """A checkpoint folder with intact steps 1 and 2, written once and copied per test."""
  d = tmp_path_factory.mktemp("pristine")
  with Checkpointer(d, max_to_keep=3, save_every=1) as ck:
    for step in (1, 2):
      ck.save(step, _random_state(step), {"pos": step}, {"step": step})
  return d


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_newest_falls_back_to_the_previous(tmp_path, two_steps, kind, caplog):
  d = tmp_path / "ck"
  shutil.copytree(two_steps, d)
  DAMAGE[kind](d / "2")
  with Checkpointer(d, max_to_keep=3, save_every=1) as ck:
    step, got, data, meta = ck.restore_latest(abstract_state(_random_state(0)))
    assert (step, data, meta) == (1, {"pos": 1}, {"step": 1})
    _assert_same(_random_state(1), got)
    assert ck.all_steps() == [1]  # the damaged step is gone: the resumed run rewrites it
    assert ck.save(2, _random_state(2), {"pos": 2}, None)
  warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
  assert any(f"{d}/2 is damaged" in w for w in warnings), warnings
  with Checkpointer(d, max_to_keep=3, save_every=1) as ck:
    assert ck.restore_latest(abstract_state(_random_state(0)))[0] == 2


def test_every_checkpoint_damaged_is_one_error(tmp_path, two_steps):
  d = tmp_path / "ck"
  shutil.copytree(two_steps, d)
  DAMAGE["1 flipped bit"](d / "2")
  DAMAGE["deleted iterator state"](d / "1")
  with Checkpointer(d, max_to_keep=3, save_every=1) as ck:
    with pytest.raises(CheckpointDamagedError, match=r"every checkpoint .* \(steps \[2, 1\]"):
      ck.restore_latest(abstract_state(_random_state(0)))
    assert ck.all_steps() == [1, 2]  # nothing deleted when nothing restored


def test_no_checkpoint_is_none(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=1, save_every=1) as ck:
    assert ck.restore_latest(abstract_state(_random_state(0))) is None


def test_other_process_count_is_not_damage(tmp_path, two_steps):
  d = tmp_path / "ck"
  shutil.copytree(two_steps, d)
  meta = d / "2" / "data" / "metadata"
  meta.write_text(json.dumps({"per_process": [{"pos": 2}, {"pos": 2}]}))  # 2 writers
  with Checkpointer(d, max_to_keep=3, save_every=1) as ck:
    with pytest.raises(CheckpointMismatchError, match="written by 2 processes, this run has 1"):
      ck.restore_latest(abstract_state(_random_state(0)))
    assert ck.all_steps() == [1, 2]


def test_a_state_of_another_structure_is_a_mismatch_not_damage(tmp_path, two_steps):
  """A changed model layout (e.g. model.scan_layers) is one clear error; nothing is deleted."""
  d = tmp_path / "ck"
  shutil.copytree(two_steps, d)
  other = dict(_random_state(0), extra=jnp.zeros((3,), jnp.float32))
  with Checkpointer(d, max_to_keep=3, save_every=1) as ck:
    with pytest.raises(CheckpointMismatchError,
                       match=r"another structure.*only in the run, e.g. \[\"\['extra'\]\"\].*"
                             r"model.scan_layers"):
      ck.restore_latest(abstract_state(other))
    assert ck.all_steps() == [1, 2]


def test_full_disk_is_one_save_error_and_keeps_earlier_steps(tmp_path):
  zeros = {"w": jnp.zeros((512, 512), jnp.float32)}  # compresses to almost nothing
  noise = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(512, 512)).astype(np.float32))}
  ck = Checkpointer(tmp_path, max_to_keep=3, save_every=1)
  ck.save(1, zeros, {"pos": 1}, None)
  ck.wait()
  with disk_limit.file_size_limit(256 * 1024):  # 1 MB of noise does not fit
    assert ck.save(2, noise, {"pos": 2}, None)  # returns at once; the write fails behind
    with pytest.raises(CheckpointSaveError) as err:
      for _ in range(600):
        ck.check()
        time.sleep(0.05)
  msg = str(err.value)
  assert "\n" not in msg and "saving step 2" in msg and "steps [1]" in msg, msg
  ck.close()  # reported once: closing does not raise it again
  with Checkpointer(tmp_path, max_to_keep=3, save_every=1) as ck:
    step, got, data, _ = ck.restore_latest(abstract_state(zeros))
  assert (step, data) == (1, {"pos": 1})
  np.testing.assert_array_equal(np.asarray(got["w"]), np.zeros((512, 512), np.float32))
