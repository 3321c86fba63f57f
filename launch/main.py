"""The one entry point: `python launch/main.py --config=configs/<job>.py[:variant]`.

Intentionally short: parse flags, set up JAX, log the devices and the resolved
config, call the library function named by `config.job`.
"""
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Job config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and reports go "
                               "(default: config.workdir).")


class _QuietLibraries:
  """Drops INFO chatter from orbax (several lines per checkpoint) from the log."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "orbax" not in record.pathname


def main(argv):
  del argv
  import logging as py_logging
  for handler in py_logging.getLogger().handlers + py_logging.getLogger("absl").handlers:
    handler.addFilter(_QuietLibraries())
  import jax

  from deepimagine_jax import jobs

  config = _CONFIG.value
  workdir = _WORKDIR.value or config.workdir
  logging.info("JAX %s: %d devices (%s) over %d processes", jax.__version__,
               jax.device_count(), jax.devices()[0].platform, jax.process_count())
  logging.info("workdir %s\nconfig:\n%s", workdir, config)
  getattr(jobs, config.job)(config, workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
