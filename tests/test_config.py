"""The typed boundary: every job config becomes a RunConfig once; bad sections fail loudly."""
import pytest

from configs import data, eval as eval_config, rl, sft
from deepimagine_jax.config import RunConfig


@pytest.mark.parametrize("module,variant", [(rl, ""), (rl, "tiny"), (sft, ""), (sft, "tiny"),
                                            (eval_config, ""), (data, "")])
def test_every_config_becomes_typed(module, variant):
  config = module.get_config(variant)
  run = RunConfig.from_config(config)
  assert run.job == config.job and run.data.sources == tuple(config.data.sources)
  if "rl" in config:
    assert run.rl.loop.steps == config.rl.steps
    assert run.rl.optimizer.total_steps == config.rl.steps  # the optimizer spans the run
    assert run.rl.max_new_tokens == config.rl.max_new_tokens  # no default of its own
  if "sft" in config:
    assert run.sft.kinds == tuple(config.sft.kinds)
  if "eval" in config:
    assert run.eval.rf_seeds == tuple(config.eval.rf_seeds)


def test_bad_sections_name_the_key():
  config = rl.get_config()
  config.rl.kinds = ("question,chain",)  # what a comma string on the command line becomes
  with pytest.raises(ValueError, match="rl.kinds"):
    RunConfig.from_config(config)
  config = rl.get_config()
  config.data.sources = ("ct_open,synthetic",)
  with pytest.raises(ValueError, match="data.sources"):
    RunConfig.from_config(config)
  config = rl.get_config()
  config.eval.mode = "vote"
  with pytest.raises(ValueError, match="eval.mode"):
    RunConfig.from_config(config)
