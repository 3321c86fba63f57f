"""A pickle loader that accepts built-in containers and scalars only.

A pickle can call any importable function while it loads; the stock `pickle.load`
must never see a file this project did not write. CT Open ships pickles of plain
dicts, lists, tuples, strings and numbers, so anything that asks the unpickler to
resolve a global other than a few builtins is refused.

Two more ways a small pickle does harm without running code, both refused before or
while it loads:
- allocation without bound through an allowed callable: `bytes(10**8)` is a 31-byte
  pickle that allocates 100 MB, and `str(x)` of a tuple whose items share one object
  through the memo grows exponentially. The builtins are handed out behind guards that
  accept only the arguments plain-data writers emit (a container to convert, scalars
  to a scalar type), whose result is no larger than the pickle itself.
- nesting deeper than MAX_DEPTH: the C unpickler hashes dict keys and set members, and
  hashing a tuple nested a million deep overflows the C stack (a segfault, not an
  exception). The opcode stream is scanned for its nesting depth first.
"""
from __future__ import annotations

import builtins
import io
import os
import pickle
import pickletools
from collections.abc import Callable
from typing import Any

MAX_DEPTH = 100  # CT Open nests about 6 deep; C recursion is safe far beyond this

_CONTAINERS = (list, tuple, set, frozenset, dict)
_SCALARS = (str, bytes, int, float, complex, bool)


class UnsafePickleError(pickle.UnpicklingError):
  """Raised when a pickle asks for anything but built-in data."""


def _guarded(name: str, ok: Callable[[tuple], bool], fn: Callable, source: str):
  """`fn` that refuses (UnsafePickleError) arguments `ok` rejects."""
  def call(*args):
    if not ok(args):
      kinds = ", ".join(type(a).__name__ for a in args)
      raise UnsafePickleError(f"{source}: refusing call {name}({kinds}); only conversions "
                              "whose result is no larger than the pickle are accepted")
    return fn(*args)
  return call


def _container_args(args: tuple) -> bool:  # set([...]), tuple(...), dict([...]) or empty
  return len(args) <= 1 and all(isinstance(a, _CONTAINERS) for a in args)


def _scalar_args(args: tuple) -> bool:  # complex(1.0, 2.0), int('12'); never str((...))
  return len(args) <= 2 and all(isinstance(a, _SCALARS) for a in args)


def _bytes_args(args: tuple) -> bool:  # bytes() or bytes(b'...'); never bytes(10**8)
  return len(args) <= 1 and all(isinstance(a, bytes) for a in args)


def _latin1_args(args: tuple) -> bool:  # protocols 0-2 write b'..' as encode('..', 'latin1')
  return (len(args) == 2 and isinstance(args[0], str)
          and args[1] in ("latin1", "latin-1"))


# Globals a pickle of plain data may legitimately reference (protocol 2+ has opcodes
# for most of these; older protocols and some writers call them by name), each with
# the check its arguments must pass.
_ALLOWED = {
    ("builtins", "set"): _container_args,
    ("builtins", "frozenset"): _container_args,
    ("builtins", "list"): _container_args,
    ("builtins", "dict"): _container_args,
    ("builtins", "tuple"): _container_args,
    ("builtins", "str"): _scalar_args,
    ("builtins", "int"): _scalar_args,
    ("builtins", "float"): _scalar_args,
    ("builtins", "complex"): _scalar_args,
    ("builtins", "bool"): _scalar_args,
    ("builtins", "bytes"): _bytes_args,
}


class _RestrictedUnpickler(pickle.Unpickler):

  def __init__(self, file, source: str):
    super().__init__(file)
    self._source = source

  def find_class(self, module: str, name: str):
    # Protocols 0-2 name builtins as Python 2's '__builtin__' (the stock find_class
    # maps this, ours replaces it) and write bytes as _codecs.encode(str, 'latin1').
    if module == "__builtin__":
      module = "builtins"
    if (module, name) == ("_codecs", "encode"):
      import _codecs
      return _guarded("_codecs.encode", _latin1_args, _codecs.encode, self._source)
    if (module, name) in _ALLOWED:
      return _guarded(name, _ALLOWED[module, name], getattr(builtins, name), self._source)
    raise UnsafePickleError(
        f"{self._source}: refusing to load global '{module}.{name}'; only "
        "built-in containers and scalars are accepted")

  def persistent_load(self, pid):
    raise UnsafePickleError(
        f"{self._source}: refusing persistent id {pid!r}")


def _kinds() -> dict:
  """Each opcode's part in the depth scan."""
  named = {"MARK": "mark", "PUT": "put", "BINPUT": "put", "LONG_BINPUT": "put",
           "MEMOIZE": "memoize", "GET": "get", "BINGET": "get", "LONG_BINGET": "get"}
  named |= dict.fromkeys(("EMPTY_LIST", "EMPTY_DICT", "EMPTY_TUPLE", "EMPTY_SET"), "new")
  named |= dict.fromkeys(("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "LIST", "DICT",
                          "FROZENSET"), "from_items")
  named |= dict.fromkeys(("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS"), "extend")
  out = {}
  for op in pickletools.opcodes:
    kind = named.get(op.name)
    if kind is None:  # scalars push one plain slot; calls and the rest keep their args' depth
      kind = "scalar" if not op.stack_before and len(op.stack_after) == 1 else "other"
    out[op] = kind
  return out


_KINDS = _kinds()


def nesting_depth(data: bytes) -> int:
  """The deepest container nesting `data` builds, from its opcodes alone (nothing is
  built). Each stack slot is a one-item list shared with the memo, so a container
  filled after it was memoised is seen at its final depth. Raises ValueError (from
  pickletools) for a stream that is not a pickle."""
  stack: list[list[int]] = []
  marks: list[int] = []  # stack heights at each MARK, as the unpickler's metastack
  memo: dict = {}
  deepest = 0
  for op, arg, _ in pickletools.genops(data):
    kind = _KINDS[op]
    if kind == "scalar":
      stack.append([0])
      continue
    if kind == "mark":
      marks.append(len(stack))
      continue
    if kind in ("put", "memoize"):
      if stack:
        memo[len(memo) if kind == "memoize" else arg] = stack[-1]
      continue
    if kind == "get":
      stack.append(memo.get(arg, [0]))
      continue
    before = op.stack_before
    if pickletools.markobject in before:  # what lies under the mark, then the items
      at = max(0, (marks.pop() if marks else 0) - before.index(pickletools.markobject))
    else:
      at = max(0, len(stack) - len(before))
    popped = stack[at:]
    del stack[at:]
    if kind == "new":
      cell = [1]
    elif kind == "from_items":
      cell = [1 + max((c[0] for c in popped), default=0)]
    elif kind == "extend" and popped:
      cell = popped[0]  # the container itself: memo aliases see it grow
      cell[0] = max(cell[0], 1 + max((c[0] for c in popped[1:]), default=0))
    elif op.name == "REDUCE":  # f(*args): the result holds the args' items, not the tuple
      cell = [max(0, popped[-1][0] - 1)] if popped else [0]
    else:  # calls (a result may hold its arguments), DUP, POP, ...
      cell = [max((c[0] for c in popped), default=0)]
    deepest = max(deepest, cell[0])
    stack.extend(cell for _ in op.stack_after)
  return deepest


def loads(data: bytes, source: str = "<bytes>") -> Any:
  """Unpickles `data`, refusing any global other than plain builtins, calls that would
  allocate more than the pickle holds, and nesting deeper than MAX_DEPTH."""
  try:
    depth = nesting_depth(data)
  except ValueError as e:
    raise pickle.UnpicklingError(f"{source}: not a readable pickle ({e})") from e
  if depth > MAX_DEPTH:
    raise UnsafePickleError(f"{source}: refusing containers nested {depth} deep "
                            f"(more than {MAX_DEPTH})")
  try:
    return _RestrictedUnpickler(io.BytesIO(data), source).load()
  except UnsafePickleError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError,
          AttributeError, IndexError, KeyError, MemoryError) as e:
    raise pickle.UnpicklingError(f"{source}: not a readable pickle ({e})") from e


def load(path: str | os.PathLike) -> Any:
  """Reads a file of built-in data written by pickle."""
  with open(path, "rb") as f:
    return loads(f.read(), source=os.fspath(path))
