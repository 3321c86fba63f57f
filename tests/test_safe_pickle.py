"""The restricted unpickler loads plain data and refuses anything that resolves a global."""
import collections
import os
import pickle

import pytest

from data_pipeline import safe_pickle


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_plain_data_round_trips(tmp_path, protocol):
  data = {("NCT1", "ep"): {"a": [1, 2.5, None, True], "b": ("x", "ü"), "c": {1, 2},
                           "d": frozenset({3}), "e": b"raw"}}
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
