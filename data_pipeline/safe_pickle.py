"""A pickle loader that accepts built-in containers and scalars only.

A pickle can call any importable function while it loads; the stock `pickle.load`
must never see a file this project did not write. CT Open ships pickles of plain
dicts, lists, tuples, strings and numbers, so anything that asks the unpickler to
resolve a global (a class, a function) is refused.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Any

# Globals a pickle of plain data may legitimately reference. Protocol 2+ emits
# opcodes for tuples/dicts/sets directly, but older protocols and some writers
# reference these builtins by name.
_ALLOWED = {
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "list"),
    ("builtins", "dict"),
    ("builtins", "tuple"),
    ("builtins", "str"),
    ("builtins", "bytes"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "complex"),
    ("builtins", "bool"),
    ("copy_reg", "_reconstructor"),
}


class UnsafePickleError(pickle.UnpicklingError):
  """Raised when a pickle asks for anything but built-in data."""


class _RestrictedUnpickler(pickle.Unpickler):

  def __init__(self, file, source: str):
    super().__init__(file)
    self._source = source

  def find_class(self, module: str, name: str):
    # Protocols 0-2 name builtins as Python 2's '__builtin__' (the stock find_class
    # maps this, ours replaces it) and write bytes as _codecs.encode(str, 'latin1'),
    # which only re-encodes a string.
    if module == "__builtin__":
      module = "builtins"
    if (module, name) == ("_codecs", "encode"):
      import _codecs
      return _codecs.encode
    if (module, name) in _ALLOWED and module == "builtins":
      import builtins
      return getattr(builtins, name)
    raise UnsafePickleError(
        f"{self._source}: refusing to load global '{module}.{name}'; only "
        "built-in containers and scalars are accepted")

  def persistent_load(self, pid):
    raise UnsafePickleError(
        f"{self._source}: refusing persistent id {pid!r}")


def loads(data: bytes, source: str = "<bytes>") -> Any:
  """Unpickles `data`, refusing any global other than plain builtins."""
  try:
    return _RestrictedUnpickler(io.BytesIO(data), source).load()
  except UnsafePickleError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError,
          AttributeError, IndexError, KeyError) as e:
    raise pickle.UnpicklingError(f"{source}: not a readable pickle ({e})") from e


def load(path: str | os.PathLike) -> Any:
  """Reads a file of built-in data written by pickle."""
  with open(path, "rb") as f:
    return loads(f.read(), source=os.fspath(path))
