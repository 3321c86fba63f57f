"""The one entry point: `python launch/main.py --config=configs/<job>.py[:variant]`.

Intentionally short: parse flags, initialise multi-host JAX when the config asks
(before any other JAX call, as JAX requires), log the devices and the resolved
config, run the job named by `config.job` from the JOBS table.
"""
import logging as py_logging

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Job config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and reports go "
                               "(default: config.workdir).")


class _QuietLibraries:
  """Drops INFO chatter from orbax (several lines per checkpoint) from the log."""

  def filter(self, record) -> bool:
    return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


def main(argv):
  del argv
  for handler in py_logging.getLogger().handlers + py_logging.getLogger("absl").handlers:
    handler.addFilter(_QuietLibraries())
  config = _CONFIG.value
  import jax  # imported here, after flags, so nothing touches a backend before initialize()
  if "mesh" in config and config.mesh.multihost:
    jax.distributed.initialize()  # TPU pods / multi-node GPU: coordinates from the environment
  from deepimagine_jax import jobs

  if config.job not in jobs.JOBS:
    raise ValueError(f"config.job: unknown job {config.job!r} (have {sorted(jobs.JOBS)})")
  workdir = _WORKDIR.value or config.workdir
  logging.info("JAX %s: %d devices (%s) over %d processes", jax.__version__,
               jax.device_count(), jax.devices()[0].platform, jax.process_count())
  logging.info("workdir %s\nconfig:\n%s", workdir, config)
  jobs.JOBS[config.job](config, workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
