"""A full disk without root: RLIMIT_FSIZE makes writes past `nbytes` fail (EFBIG).

The kernel would send SIGXFSZ (which kills the process); ignored, the write fails
with OSError instead, as on a full disk. Limits and the handler come back on exit.
"""
import contextlib
import resource
import signal


@contextlib.contextmanager
def file_size_limit(nbytes: int):
  old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
  old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old_limit[1]))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
    signal.signal(signal.SIGXFSZ, old_handler)
