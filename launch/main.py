"""The one entry point: `python launch/main.py --config=configs/<job>.py[:variant]`.

Intentionally short: parse flags, initialise multi-host JAX when the config asks
(before any other JAX call, as JAX requires), log the devices and the resolved
config, run the job named by `config.job` from `jobs_table()`. A bad flag, config
key or value, a missing data root, or a failed checkpoint save ends the run with
one line on stderr (exit status 1), not a traceback.
"""
import logging as py_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Job config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and reports go "
                               "(default: config.workdir).")


class _QuietLibraries:
  """Drops orbax's INFO chatter (several lines per checkpoint), and the tracebacks its
  background threads log for a failed save, which checkpoint.py reports in one line."""

  def filter(self, record) -> bool:
    if "orbax" not in record.pathname:
      return True
    return record.levelno >= py_logging.WARNING and not record.exc_info


def _quiet_unraisable(unraisable, default=sys.unraisablehook):
  """Drops tensorstore's callbacks into Orbax's closed event loop after a failed save or
  restore (one 6-line traceback per pending write, at exit); reports anything else."""
  if not (isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == "Event loop is closed"):
    default(unraisable)


def _parse_flags(argv):
  """absl's flag parsing, with a bad flag or config override as one line naming it."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit("error: " + " ".join(str(e).split()))
  except (AttributeError, KeyError) as e:  # ml_collections: an override of an undeclared key
    key = str(e).strip("\"'")
    named = [a.split("=")[0] for a in argv if f".{key}." in a.split("=")[0] + "."]
    sys.exit(f"error: {named[0] if named else key}: the config declares no such key "
             "(every key is declared once, in configs/)")


def jobs_table() -> dict:
  """config.job -> the library function that runs it (imported once JAX may be touched)."""
  from deepimagine_jax import jobs, serve, traces, world
  return {"sft": jobs.sft, "rl": jobs.rl, "eval": jobs.eval, "data": jobs.data,
          "serve": serve.serve, "traces": traces.traces, "world": world.world}


def main(argv):
  del argv
  for handler in py_logging.getLogger().handlers + py_logging.getLogger("absl").handlers:
    handler.addFilter(_QuietLibraries())
  sys.unraisablehook = _quiet_unraisable
  config = _CONFIG.value
  from data_pipeline.data_root import DataRootError
  from deepimagine_jax.checkpoint import CheckpointError
  from deepimagine_jax.config import ConfigError, MeshConfig
  try:
    if "mesh" in config:
      from deepimagine_jax import sharding
      mesh_cfg = MeshConfig.from_config(config.mesh)
      sharding.split_cpu_host(mesh_cfg.host_devices)
      if mesh_cfg.multihost:
        sharding.initialize_hosts(mesh_cfg)
    import jax  # nothing above touched a backend: initialize() had to come first
    jobs = jobs_table()
    if config.job not in jobs:
      raise ConfigError(f"config.job={config.job!r}: must be one of {sorted(jobs)}")
    workdir = _WORKDIR.value or config.workdir
    logging.info("JAX %s: %d devices (%s) over %d processes", jax.__version__,
                 jax.device_count(), jax.devices()[0].platform, jax.process_count())
    logging.info("workdir %s\nconfig:\n%s", workdir, config)
    jobs[config.job](config, workdir)
  except (ConfigError, DataRootError, CheckpointError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=_parse_flags)
