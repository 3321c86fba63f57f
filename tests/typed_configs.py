"""Typed configs for tests: the declared config values (configs/), with overrides.

The library's config dataclasses have no defaults of their own; tests start from
the values `configs/` declares and replace what a test is about.
"""
import dataclasses

from configs import common
from configs import rl as rl_config
from deepimagine_jax.config import EvalConfig, LoopConfig, OptimizerConfig, RLConfig, SFTConfig


def optimizer(steps: int, **overrides) -> OptimizerConfig:
  return dataclasses.replace(OptimizerConfig.for_run(common.optimizer(), steps), **overrides)


def loop(steps: int, **overrides) -> LoopConfig:
  return dataclasses.replace(LoopConfig.of(common.sft(steps=steps)), **overrides)


def sft(steps: int, global_batch_size: int, optimizer_cfg: OptimizerConfig | None = None,
        **loop_overrides) -> SFTConfig:
  cfg = SFTConfig.from_config(common.sft(steps=steps, batch=global_batch_size))
  return dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, **loop_overrides),
                             optimizer=optimizer_cfg or cfg.optimizer)


def rl(steps: int, optimizer_cfg: OptimizerConfig | None = None, loop_overrides=None,
       **overrides) -> RLConfig:
  """`overrides` are rl-section keys, applied before typing (the schedule follows them)."""
  section = rl_config.rl_section(steps)
  section.update(overrides)
  cfg = RLConfig.from_config(section)
  return dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, **(loop_overrides or {})),
                             optimizer=optimizer_cfg or cfg.optimizer)


def eval_(**overrides) -> EvalConfig:
  return dataclasses.replace(EvalConfig.from_config(common.eval_()), **overrides)
