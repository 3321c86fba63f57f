"""Test setup: 8 fake CPU devices, set once before JAX is imported."""
import os

# The tests' programs are tiny, so compiling them costs far more than running them: LLVM at
# optimisation level 0 without its expensive passes compiles about a third faster (the RL job
# test on a Gemma 3 checkpoint: 58 -> 39 s). What a program computes is unchanged; only how
# fast the machine code runs. The benches and real runs keep XLA's defaults.
# Compute-bound tests (the synthetic GRPO proof's 260 steps) run in a child process without
# these flags (test_entry.launch_env(..., optimized=True)): there running costs more than compiling.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                      "--xla_llvm_disable_expensive_passes=true")
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
     *FAST_COMPILE_FLAGS]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the entry tests' subprocesses) compile the same programs: a
# persistent compilation cache shared by the session turns repeats into loads.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402


def _session_dir(var: str, prefix: str) -> None:
  """$var, a folder for this test run: made (and removed at exit) by the process that starts
  the run; the xdist workers and subprocesses inherit it. A folder the user set is kept."""
  if var not in os.environ:
    os.environ[var] = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, os.environ[var], True)


_session_dir("JAX_COMPILATION_CACHE_DIR", "deepimagine-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The xdist workers and the entry tests' subprocesses inherit this environment, so they all
# share the one cache. JAX writes an entry in place; with a size limit set it takes a file
# lock around every read and write, so no process reads another's half-written entry.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))
# Things built once per test run and shared by the xdist workers (tests/tiny_policy.py).
_session_dir("DEEPIMAGINE_TEST_SHARED", "deepimagine-tests-")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
USER_DATA = os.environ.get("DEEPIMAGINE_DATA", "")  # before the data_root fixture sets it


@pytest.fixture(scope="session", autouse=True)
def data_root(tmp_path_factory) -> pathlib.Path:
  """The tests' data root, from the repo's own files (tests/data_files.py), whether or not
  ../shared/data exists: the embedded public-domain registry sample with small CT Open-format
  releases carved out of it. Also the library's default root for the whole session
  ($DEEPIMAGINE_DATA, inherited by the subprocesses of the entry tests)."""
  import data_files
  root = data_files.make_data_root(tmp_path_factory.mktemp("data") / "root")
  os.environ["DEEPIMAGINE_DATA"] = str(root)
  return root


@pytest.fixture(scope="session")
def full_data() -> pathlib.Path:
  """The full data ($DEEPIMAGINE_DATA as set before the session, else ../shared/data) for the
  few tests that check facts of the real files (CT Open's counts, named records); skipped,
  and counted as skipped, on a fresh clone without it."""
  from data_pipeline import data_root as dr
  root = pathlib.Path(USER_DATA) if USER_DATA else dr.SHARED
  if not (root / "ct_open" / "Summer_2025.pickle").is_file():
    pytest.skip(f"needs the full data (CT Open) at {root}")
  return root


def pytest_collection_modifyitems(items):
  """Tests that read the full data carry the marker `full_data` (.ci/run selects them)."""
  for item in items:
    if "full_data" in getattr(item, "fixturenames", ()):
      item.add_marker(pytest.mark.full_data)
  # Files holding a `slow` test first (stable sort): under xdist (pytest.ini) the long files
  # start at once rather than leaving one worker busy at the end while the other waits.
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow_files)
