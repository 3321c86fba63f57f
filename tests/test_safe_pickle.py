"""The restricted unpickler loads plain data and refuses anything that resolves a global."""
import collections
import os
import pickle

import hypothesis
import hypothesis.strategies as st
import pytest

from data_pipeline import safe_pickle


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_plain_data_round_trips(tmp_path, protocol):
  data = {("NCT1", "ep"): {"a": [1, 2.5, None, True], "b": ("x", "ü"), "c": {1, 2},
                           "d": frozenset({3}), "e": b"raw", "f": 1 + 2j, "g": b""}}
  path = tmp_path / "ok.pickle"
  path.write_bytes(pickle.dumps(data, protocol=protocol))
  assert safe_pickle.load(path) == data


class Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned",))


@pytest.mark.parametrize("obj", [os.system, Evil(), collections.OrderedDict(a=1),
                                 pickle.Pickler])
def test_globals_refused(tmp_path, obj):
  path = tmp_path / "bad.pickle"
  path.write_bytes(pickle.dumps(obj, protocol=2))
  with pytest.raises(safe_pickle.UnsafePickleError, match="refusing"):
    safe_pickle.load(path)


def test_hand_written_reduce_refused():
  # GLOBAL 'posix system', then REDUCE: the classic code-running pickle.
  payload = b"cposix\nsystem\n(S'echo pwned'\ntR."
  with pytest.raises(safe_pickle.UnsafePickleError):
    safe_pickle.loads(payload)


def test_truncated_pickle_is_an_unpickling_error():
  data = pickle.dumps({"a": list(range(100))})
  with pytest.raises(pickle.UnpicklingError, match="not a readable pickle"):
    safe_pickle.loads(data[:20])


def _shared(n: int) -> tuple:
  t = ("x",)
  for _ in range(n):
    t = (t,) * n
  return t


# Hand-written pickles that allocate without bound through an allowed callable.
UNBOUNDED = {
    # 31 bytes, 100 MB: GLOBAL builtins.bytes, BININT 10**8, TUPLE1, REDUCE
    "bytes(10**8)": b"\x80\x02c__builtin__\nbytes\nJ\x00\xe1\xf5\x05\x85R.",
    "bytes(10**8) protocol 0": b"cbuiltins\nbytes\n(I100000000\ntR.",
    # str() of a tuple holding one tuple 20 times, 20 deep through the memo: 20**20 items
    "str(shared tuples)": b"\x80\x02c__builtin__\nstr\n" + pickle.dumps(_shared(20), 2)[2:-1]
                          + b"\x85R.",
    "list(bytes)": b"\x80\x02c__builtin__\nlist\nC\x03abc\x85R.",
    "_codecs.encode(s, 'hex')": b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x03\x00\x00\x00hex\x86R.",
}


@pytest.mark.parametrize("name", sorted(UNBOUNDED))
def test_unbounded_allocation_refused(name):
  with pytest.raises(safe_pickle.UnsafePickleError, match="refusing call"):
    safe_pickle.loads(UNBOUNDED[name])


def test_deep_tuple_key_refused_before_it_is_hashed():
  # {((((...)))): None} nested a million deep: hashing it overflows the C stack (SIGSEGV)
  payload = b"\x80\x02}" + b")" + b"\x85" * 10**6 + b"Ns."
  with pytest.raises(safe_pickle.UnsafePickleError, match="nested 1000002 deep"):
    safe_pickle.loads(payload)


def test_memo_shared_key_loads_small():
  # sharing is not copying: a key whose repr would be 10**8 long is still 9 objects
  t = _shared(8)
  data = pickle.dumps({t: 1}, protocol=2)
  assert len(data) < 400 and next(iter(safe_pickle.loads(data))) == t


def _depth(x) -> int:
  """Reference: container nesting of a built object, by plain recursion."""
  if isinstance(x, dict):
    return 1 + max((max(_depth(k), _depth(v)) for k, v in x.items()), default=0)
  if isinstance(x, (list, tuple, set, frozenset)):
    return 1 + max((_depth(v) for v in x), default=0)
  return 0


_plain = st.recursive(
    st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=3),
              st.binary(max_size=3)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner, inner),
                            st.dictionaries(st.text(max_size=2), inner, max_size=3),
                            st.frozensets(st.integers(), max_size=2)),
    max_leaves=12)


@hypothesis.settings(max_examples=60, deadline=None, derandomize=True, database=None)
@hypothesis.given(obj=_plain, protocol=st.sampled_from([0, 2, 3, pickle.HIGHEST_PROTOCOL]))
def test_nesting_depth_matches_the_built_object(obj, protocol):
  data = pickle.dumps(obj, protocol=protocol)
  # before protocol 4, sets and bytes are calls: their argument tuple, built and dropped
  # while loading, may be one level deeper than anything kept
  slack = 0 if protocol >= 4 else 1
  assert _depth(obj) <= safe_pickle.nesting_depth(data) <= _depth(obj) + slack
  assert safe_pickle.loads(data) == obj


def test_depth_follows_a_list_filled_after_it_was_memoised():
  inner = []
  outer = [inner, inner]
  inner.append([[[1]]])
  assert safe_pickle.nesting_depth(pickle.dumps(outer, protocol=2)) == _depth(outer) == 5
