"""The functions `launch/main.py` calls, one per `config.job`.

Each takes the locked ConfigDict and a work directory, turns the config into
typed dataclasses at this boundary, and calls the library.
"""
from __future__ import annotations

import json
import logging
import os

import jax
from flax import nnx

from data_pipeline import build as data_build
from data_pipeline import grain_pipeline
from deepimagine_jax import hf_import
from deepimagine_jax import rl as rl_lib
from deepimagine_jax import sft as sft_lib
from deepimagine_jax import sharding
from deepimagine_jax.config import ModelConfig
from deepimagine_jax.eval import run as eval_run
from deepimagine_jax.optimizer import OptimizerConfig
from deepimagine_jax.tokenizer import Tokenizer


def _kinds(csv: str) -> list[str]:
  return [k.strip() for k in csv.split(",") if k.strip()]


def model_config(config, tokenizer: Tokenizer) -> ModelConfig:
  """The model shape from the config, its vocabulary sized to the tokenizer."""
  m = config.model
  if m.hf_checkpoint:
    with open(os.path.join(m.hf_checkpoint, "config.json")) as f:
      cfg = hf_import.config_from_hf(json.load(f))
    return cfg.replace(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
  cfg = ModelConfig.from_dict({"preset": m.preset, "dtype": m.dtype,
                               "param_dtype": m.param_dtype, "remat": m.remat})
  return cfg.replace(vocab_size=tokenizer.vocab_size)


def prepare_data(config, workdir: str):
  """Builds (or reuses) the examples and the tokenizer."""
  built = data_build.build_dataset(config.data, workdir)
  tokenizer_path = built.tokenizer_path
  if config.model.hf_checkpoint:
    tokenizer_path = os.path.join(config.model.hf_checkpoint, "tokenizer.model")
    if not os.path.exists(tokenizer_path):
      raise FileNotFoundError(
          f"{tokenizer_path}: a Hugging Face checkpoint needs a SentencePiece tokenizer.model "
          "beside it (Llama-2 / Gemma style); tokenizer.json-only models are not supported yet")
  return built, Tokenizer.load(tokenizer_path)


def _initial_params(config, model_cfg: ModelConfig, mesh):
  if not config.model.hf_checkpoint:
    return None
  _, model = hf_import.load_hf_checkpoint(config.model.hf_checkpoint, mesh,
                                          dtype=config.model.param_dtype,
                                          compute_dtype=config.model.dtype)
  return nnx.split(model)[1]


def _opt(section, steps: int) -> OptimizerConfig:
  d = dict(section)
  d["total_steps"] = steps
  d["warmup_steps"] = min(d["warmup_steps"], steps - 1)  # optax needs a decay phase
  return OptimizerConfig(**d)


def run_sft_stage(config, workdir: str, built, tokenizer, mesh):
  """SFT on the configured example kinds of the train split; returns (graphdef, params)."""
  s = config.sft
  model_cfg = model_config(config, tokenizer)
  records = built.examples("train", kinds=_kinds(s.kinds))
  if not records:
    raise ValueError(f"no training examples of kinds {s.kinds!r} in {built.dir}")
  logging.info("SFT on %d examples (%s)", len(records), s.kinds)
  batches = grain_pipeline.make_sft_iterator(
      records, tokenizer, seq_len=config.data.seq_len, global_batch_size=s.global_batch_size,
      seed=config.seed, pack=config.data.pack, shard_index=jax.process_index(),
      shard_count=jax.process_count())
  tcfg = sft_lib.TrainConfig(steps=s.steps, global_batch_size=s.global_batch_size,
                             seq_len=config.data.seq_len, checkpoint_every=s.checkpoint_every,
                             keep_checkpoints=s.keep_checkpoints, log_every=s.log_every,
                             resume=s.resume)
  graphdef, state = sft_lib.run_sft(
      model_cfg, _opt(s.optimizer, s.steps), tcfg, mesh, batches, workdir, seed=config.seed,
      init_params=_initial_params(config, model_cfg, mesh))
  export_policy(graphdef, state.params, model_cfg, tokenizer, os.path.join(workdir, POLICY_DIR))
  return graphdef, state.params


def sft(config, workdir: str):
  mesh = sharding.mesh_from_config(config.mesh)
  built, tokenizer = prepare_data(config, workdir)
  run_sft_stage(config, workdir, built, tokenizer, mesh)


def data(config, workdir: str):
  built = data_build.build_dataset(config.data, workdir)
  print(json.dumps({"build_dir": str(built.dir), "splits": list(built.splits)}, indent=1))


def _rl_config(r) -> rl_lib.RLConfig:
  weights = tuple((k.strip(), float(v)) for k, v in
                  (kv.split("=") for kv in r.reward_weights.split(",") if kv.strip()))
  return rl_lib.RLConfig(
      steps=r.steps, prompts_per_step=r.prompts_per_step, group_size=r.group_size,
      max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
      eps_low=r.eps_low, eps_high=r.eps_high, beta=r.beta, aggregation=r.aggregation,
      scale_by_std=r.scale_by_std, mu=r.mu, recompute_old_logprobs=r.recompute_old_logprobs,
      reward_weights=weights, cache_dtype=r.cache_dtype, checkpoint_every=r.checkpoint_every,
      keep_checkpoints=r.keep_checkpoints, log_every=r.log_every, resume=r.resume)


def rl(config, workdir: str):
  """The main job: data -> SFT warm start -> GRPO -> evaluation and report."""
  mesh = sharding.mesh_from_config(config.mesh)
  built, tokenizer = prepare_data(config, workdir)
  sft_dir = os.path.join(workdir, "sft")
  graphdef, params = run_sft_stage(config, sft_dir, built, tokenizer, mesh)
  r = config.rl
  records = [ex for split in _kinds(r.splits) for ex in built.examples(split, _kinds(r.kinds))]
  if not records:
    raise ValueError(f"no RL prompts of kinds {r.kinds!r} in splits {r.splits!r}")
  logging.info("GRPO on %d prompts (%s from %s)", len(records), r.kinds, r.splits)
  prompts = grain_pipeline.make_prompt_iterator(
      records, tokenizer, prompt_len=config.data.prompt_len, batch_size=r.prompts_per_step,
      seed=config.seed, shard_index=jax.process_index(), shard_count=jax.process_count())
  rcfg = _rl_config(r)
  # The reference is the SFT policy; its handle (dir + step) goes into every RL checkpoint.
  ref_handle = {"dir": os.path.join(sft_dir, "checkpoints"), "step": config.sft.steps}
  state = rl_lib.run_grpo(rcfg, _opt(r.optimizer, r.steps), mesh, graphdef, params,
                          params if rcfg.beta > 0 else None, prompts, tokenizer,
                          os.path.join(workdir, "rl"), seed=config.seed,
                          ref_handle=ref_handle)
  export_policy(graphdef, state.params, model_config(config, tokenizer), tokenizer,
                os.path.join(workdir, POLICY_DIR))
  _evaluate(config, workdir, built, tokenizer, graphdef, state.params,
            metrics_logs=[os.path.join(sft_dir, "metrics.jsonl"),
                          os.path.join(workdir, "rl", "metrics.jsonl")])


def _evaluate(config, workdir, built, tokenizer, graphdef, params, metrics_logs=()):
  examples = {split: built.examples(split) for split in built.splits}
  results = eval_run.evaluate(graphdef, params, tokenizer, examples, config.eval,
                              prompt_len=config.data.prompt_len, workdir=workdir,
                              metrics_logs=[p for p in metrics_logs if os.path.exists(p)])
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(results, f, indent=1, default=float)
  return results


POLICY_DIR = "policy"  # under a run's workdir: HF-format weights + the tokenizer


def export_policy(graphdef, params, model_cfg: ModelConfig, tokenizer: Tokenizer, out_dir: str):
  """Writes the policy as a Hugging Face checkpoint with its tokenizer beside it."""
  hf_import.export_hf_checkpoint(nnx.merge(graphdef, params), model_cfg, out_dir)
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
      f.write(tokenizer.model_proto)
  logging.info("policy written to %s", out_dir)


def load_policy(run_dir: str, mesh, dtype: str):
  """(graphdef, params, tokenizer) of the policy a run exported."""
  d = os.path.join(run_dir, POLICY_DIR)
  if not os.path.isdir(d):
    raise FileNotFoundError(f"{d}: no exported policy (a finished sft or rl run writes one)")
  _, model = hf_import.load_hf_checkpoint(d, mesh, dtype=dtype)
  graphdef, params = nnx.split(model)
  return graphdef, params, Tokenizer.load(os.path.join(d, "tokenizer.model"))


def eval(config, workdir: str):  # noqa: A001 - the job is called "eval" in configs
  """Baselines, and the model when a checkpoint is given, in one table."""
  built, tokenizer = prepare_data(config, workdir)
  graphdef = params = None
  if config.eval.checkpoint:
    mesh = sharding.mesh_from_config(config.mesh)
    graphdef, params, tokenizer = load_policy(config.eval.checkpoint, mesh, config.model.dtype)
  logs = [os.path.join(config.eval.checkpoint, sub, "metrics.jsonl") for sub in ("sft", "rl")] \
      if config.eval.checkpoint else []
  _evaluate(config, workdir, built, tokenizer, graphdef, params, metrics_logs=logs)
