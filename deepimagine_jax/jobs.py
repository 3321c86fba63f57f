"""The training, evaluation and data jobs `launch/main.py` runs (its jobs_table).

Each turns the locked ConfigDict into typed dataclasses once (`RunConfig`) and
calls the library with them; nothing below this file sees a ConfigDict.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os

import jax
from flax import nnx

from data_pipeline import build as data_build
from data_pipeline import grain_pipeline
from data_pipeline import io
from deepimagine_jax import hf_import
from deepimagine_jax import lora
from deepimagine_jax import rewards
from deepimagine_jax import rl as rl_lib
from deepimagine_jax import sft as sft_lib
from deepimagine_jax import sharding
from deepimagine_jax import train_state
from deepimagine_jax import traces as traces_lib
from deepimagine_jax.config import LoRAConfig, ModelConfig, ModelSection, RunConfig
from deepimagine_jax.embed import Embedder
from deepimagine_jax.eval import run as eval_run
from deepimagine_jax.tokenizer import Tokenizer

POLICY_DIR = "policy"  # under a stage's workdir: HF-format weights + the tokenizer


def model_config(model: ModelSection, tokenizer: Tokenizer) -> ModelConfig:
  """The model shape: the checkpoint's, or the preset's with the vocabulary sized to the
  tokenizer; model.scan_layers None keeps the preset's (or the checkpoint depth's) layout."""
  layout = {} if model.scan_layers is None else {"scan_layers": model.scan_layers}
  if model.hf_checkpoint:
    with open(os.path.join(model.hf_checkpoint, "config.json")) as f:
      cfg = hf_import.config_from_hf(json.load(f))
    return cfg.replace(dtype=model.dtype, param_dtype=model.param_dtype, remat=model.remat,
                       **layout)
  cfg = getattr(ModelConfig, model.preset)()
  return cfg.replace(dtype=model.dtype, param_dtype=model.param_dtype, remat=model.remat,
                     vocab_size=tokenizer.vocab_size, **layout)


def build_data(run: RunConfig, workdir: str):
  """The data build (one process builds, the others reuse it), with the dense encoder if asked."""
  embed = dense_embedder(run) if run.data.retriever == "dense" else None
  return sharding.primary_first(
      lambda: data_build.build_dataset(run.data, workdir, train_tokenizer=Tokenizer.train,
                                       embed=embed),
      "data build")


def dense_embedder(run: RunConfig) -> Embedder:
  """The pretrained checkpoint as the dense retriever's encoder (mean-pooled hidden states)."""
  if run.model is None or not run.model.hf_checkpoint:
    raise ValueError("data.retriever 'dense' embeds trials with a pretrained model: set "
                     "model.hf_checkpoint (or use data.retriever 'tfidf' / 'bm25')")
  path = run.model.hf_checkpoint
  _, model = hf_import.load_hf_checkpoint(path, sharding.mesh_from_config(run.mesh),
                                          dtype=run.model.param_dtype,
                                          compute_dtype=run.model.dtype,
                                          scan_layers=run.model.scan_layers)
  graphdef, params = nnx.split(model)
  return Embedder(graphdef, params, Tokenizer.load(path), name=os.path.abspath(path),
                  max_len=run.data.embed_max_len, batch_size=run.data.embed_batch_size)


def prepare_data(run: RunConfig, workdir: str):
  """Builds (or reuses) the examples; (built, tokenizer): the checkpoint's tokenizer, else the build's.

  A checkpoint folder's tokenizer.json (Qwen3, Llama-3) or tokenizer.model
  (Gemma, Llama-2) is read with its tokenizer_config.json / generation_config.json.
  """
  built = build_data(run, workdir)
  if run.model is not None and run.model.hf_checkpoint:
    return built, Tokenizer.load(run.model.hf_checkpoint)
  return built, Tokenizer.load(built.tokenizer_path)


def initial_model(run: RunConfig, model_cfg: ModelConfig, mesh):
  """(graphdef, params): the Hugging Face checkpoint's weights, else a fresh random model;
  with LoRA adapters (config.lora.rank > 0) added on top."""
  if run.model.hf_checkpoint:
    _, model = hf_import.load_hf_checkpoint(run.model.hf_checkpoint, mesh,
                                            dtype=run.model.param_dtype,
                                            compute_dtype=run.model.dtype,
                                            scan_layers=run.model.scan_layers)
    graphdef, params = nnx.split(model)
  else:
    graphdef, params = train_state.init_params(model_cfg, mesh, run.seed)
  if run.lora is None:
    return graphdef, params
  return lora.attach(graphdef, params, run.lora, mesh, run.seed)


def adapter_route(lcfg):
  """perturbation -> adapter index (lora.route) when examples choose among several adapters;
  None otherwise (every row uses the active adapter, or there are no adapters)."""
  if lcfg is None or not lcfg.enabled or lcfg.route == "active":
    return None
  return functools.partial(lora.route, lcfg)


def write_adapter_counts(lcfg, records, workdir: str) -> dict[str, int]:
  """Training examples per adapter under lcfg.route, logged and written to sft_adapters.json
  (an adapter no example reaches trains on nothing: its count says so)."""
  counts = collections.Counter(lora.route(lcfg, ex.perturbation) for ex in records)
  out = {name: counts[i] for i, name in enumerate(lcfg.adapters)}
  logging.info("SFT examples per adapter (lora.route %r): %s", lcfg.route, out)
  if jax.process_index() == 0:
    io.write_json(os.path.join(workdir, "sft_adapters.json"), out)
  return out


def run_sft_stage(run: RunConfig, workdir: str, built, tokenizer, mesh):
  """SFT on the configured example kinds of the train split; returns (graphdef, params)."""
  cfg = run.sft
  model_cfg = model_config(run.model, tokenizer)
  records = built.examples("train", kinds=cfg.kinds)
  if not records:
    raise ValueError(f"sft.kinds: no training examples of kinds {cfg.kinds} in {built.dir}")
  # sft.imagined / sft.traces: imagined steps added, traces joined (counts: sft_traces.json)
  records = traces_lib.sft_records(cfg, records, tokenizer, run.data.seq_len, workdir)
  logging.info("SFT on %d examples (%s)", len(records), ", ".join(cfg.kinds))
  route = adapter_route(run.lora)
  if route is not None:
    write_adapter_counts(run.lora, records, workdir)
  batches = grain_pipeline.make_sft_iterator(
      records, tokenizer, seq_len=run.data.seq_len, global_batch_size=cfg.global_batch_size,
      seed=run.seed, pack=run.data.pack, shard_index=jax.process_index(),
      shard_count=jax.process_count(), route=route)
  graphdef, params = initial_model(run, model_cfg, mesh)
  state = sft_lib.run_sft(cfg, mesh, graphdef, params, batches, workdir, seed=run.seed,
                          routed=route is not None)
  params = lora.combine(state.params, params)  # the trained part over the frozen base
  export_policy(graphdef, params, model_cfg, tokenizer, os.path.join(workdir, POLICY_DIR),
                base_checkpoint=run.model.hf_checkpoint)
  return graphdef, params


ROUTED_LORA_FILE = "routed_lora.json"  # in policy/: a routed run's adapters and their base


def export_policy(graphdef, params, model_cfg: ModelConfig, tokenizer: Tokenizer, out_dir: str,
                  *, base_checkpoint: str = ""):
  """Writes the policy as a Hugging Face checkpoint with the tokenizer files it was trained with.

  With LoRA the weights are merged (the active adapter) and every adapter is also
  written alone in PEFT's format under `adapters/<name>/` (their base: `base_checkpoint`,
  the run's model.hf_checkpoint). Adapters routed by factor are one policy only together:
  ROUTED_LORA_FILE then records their config and base, and load_policy rebuilds it.
  """
  model = nnx.merge(graphdef, params)
  hf_import.export_hf_checkpoint(model, model_cfg, out_dir)
  lcfg = model.lora_cfg
  for name in lcfg.adapters if lcfg is not None else ():
    hf_import.export_peft_adapter(model, model_cfg, os.path.join(out_dir, "adapters", name),
                                  adapter=name, base_model=base_checkpoint)
  if jax.process_index() == 0:
    tokenizer.save(out_dir)
    if lcfg is not None and lcfg.route == "factor":
      io.write_json(os.path.join(out_dir, ROUTED_LORA_FILE),
                    {"lora": dataclasses.asdict(lcfg), "base_checkpoint": base_checkpoint})
  logging.info("policy written to %s", out_dir)


def load_policy(run_dir: str, mesh, dtype: str):
  """(graphdef, params, tokenizer) of the policy a run exported.

  A run whose adapters are routed by factor comes back as its base checkpoint with every
  adapter loaded from `adapters/<name>/` (the merged weights hold the general one only).
  """
  d = os.path.join(run_dir, POLICY_DIR)
  if not os.path.isdir(d):
    raise FileNotFoundError(f"{d}: no exported policy (a finished sft or rl run writes one)")
  routed = os.path.join(d, ROUTED_LORA_FILE)
  if not os.path.exists(routed):
    _, model = hf_import.load_hf_checkpoint(d, mesh, dtype=dtype)
    graphdef, params = nnx.split(model)
    return graphdef, params, Tokenizer.load(d)
  with open(routed) as f:
    meta = json.load(f)
  lcfg = LoRAConfig(**{k: tuple(v) if isinstance(v, list) else v
                       for k, v in meta["lora"].items()})
  base = meta["base_checkpoint"]
  if not base or not os.path.isdir(base):
    why = "not a folder here" if base else "not recorded: the run started from random weights"
    raise FileNotFoundError(
        f"{routed}: adapters routed by factor need the base checkpoint they were trained on "
        f"(base_checkpoint {base!r}: {why}); evaluate within the run (configs/rl.py "
        f"evaluates its own policy), or put the base at that path")
  model_cfg, model = hf_import.load_hf_checkpoint(base, mesh, dtype=dtype)
  graphdef, params = lora.attach(*nnx.split(model), lcfg, mesh, 0)
  model = nnx.merge(graphdef, params)
  for name in lcfg.adapters:
    hf_import.load_peft_adapter(model, model_cfg, os.path.join(d, "adapters", name),
                                adapter=name)
  graphdef, params = nnx.split(model)
  return graphdef, params, Tokenizer.load(d)


def require_eval_questions(run: RunConfig, built) -> None:
  """Stops before any training when the build has nothing to evaluate on (CT Open absent
  and no registry source to derive eval questions from), naming the keys to change."""
  if "eval" in built.splits and eval_run.eval_questions({"eval": built.examples("eval")}):
    return
  raise ValueError(
      f"data.sources={run.data.sources}: the build has no eval questions (CT Open's Summer "
      f"release was not found, and no registry source gives registry-derived ones): add "
      f"'ctgov_xml' to data.sources (data.registry_eval_fraction > 0) or set data.root / "
      f"$DEEPIMAGINE_DATA to a folder holding ct_open/Summer_2025.pickle")


def evaluate(run: RunConfig, workdir: str, built, tokenizer, graphdef, params,
             metrics_logs=()):
  """Evaluation and report under workdir; {name: metrics}, also written to summary.json."""
  examples = {split: built.examples(split) for split in built.splits}
  results = eval_run.evaluate(graphdef, params, tokenizer, examples, run.eval,
                              prompt_len=run.data.prompt_len, workdir=workdir,
                              metrics_logs=[p for p in metrics_logs if os.path.exists(p)],
                              seed=run.seed)
  io.write_json(os.path.join(workdir, "summary.json"), results)
  return results


def sft(config, workdir: str):
  """SFT alone: data, tokenizer, training, policy export."""
  run = RunConfig.from_config(config)
  mesh = sharding.mesh_from_config(run.mesh)
  built, tokenizer = prepare_data(run, workdir)
  run_sft_stage(run, workdir, built, tokenizer, mesh)


def grpo_prompts(run: RunConfig, built, tokenizer, *, shard_index: int, shard_count: int):
  """(prompt iterator, class balance): host `shard_index` of `shard_count`'s rows of each
  step's `rl.prompts_per_step`; the balance is over every RL prompt, the same on all hosts.

  The hosts' rows, in process order, are the global batch (tests feed them to one
  process to check a multi-host run against it)."""
  cfg = run.rl
  records = [ex for split in cfg.splits for ex in built.examples(split, cfg.kinds)]
  if not records:
    raise ValueError(f"rl.kinds / rl.splits: no prompts of kinds {cfg.kinds} in splits "
                     f"{cfg.splits}")
  logging.info("GRPO on %d prompts (%s from %s)", len(records), ", ".join(cfg.kinds),
               ", ".join(cfg.splits))
  prompts = grain_pipeline.make_prompt_iterator(
      records, tokenizer, prompt_len=run.data.prompt_len, batch_size=cfg.prompts_per_step,
      seed=run.seed, shard_index=shard_index, shard_count=shard_count,
      route=adapter_route(run.lora))
  # Rewards are class-balanced over the labels of the prompts GRPO draws from.
  balance = rewards.ClassBalance.of([ex.label for ex in records],
                                    [ex.n_options for ex in records])
  return prompts, balance


def run_grpo_stage(run: RunConfig, workdir: str, built, tokenizer, mesh, graphdef, params,
                   sft_dir: str):
  """GRPO (`<workdir>/rl`) from the SFT policy, which is also its reference; the final state."""
  cfg = run.rl
  prompts, balance = grpo_prompts(run, built, tokenizer, shard_index=jax.process_index(),
                                  shard_count=jax.process_count())
  logging.info("GRPO class weights (n_options, label) -> weight: %s", balance.weights)
  # The reference is the SFT policy; its handle (dir + step) goes into every RL checkpoint.
  # With LoRA it is the base with the adapters off.
  ref_handle = {"dir": os.path.join(sft_dir, "checkpoints"), "step": run.sft.loop.steps}
  if run.lora is not None and run.lora.enabled:
    ref_handle = {"base": run.model.hf_checkpoint or f"random init, seed {run.seed}",
                  "adapters": "off"}
  return rl_lib.run_grpo(cfg, mesh, graphdef, params, params if cfg.beta > 0 else None,
                         prompts, tokenizer, os.path.join(workdir, "rl"), seed=run.seed,
                         ref_handle=ref_handle, balance=balance)


def rl(config, workdir: str):
  """The main job: data -> SFT warm start -> GRPO -> evaluation and report."""
  run = RunConfig.from_config(config)
  mesh = sharding.mesh_from_config(run.mesh)
  built, tokenizer = prepare_data(run, workdir)
  require_eval_questions(run, built)
  sft_dir = os.path.join(workdir, "sft")
  graphdef, params = run_sft_stage(run, sft_dir, built, tokenizer, mesh)
  state = run_grpo_stage(run, workdir, built, tokenizer, mesh, graphdef, params, sft_dir)
  params = lora.combine(state.params, params)
  export_policy(graphdef, params, model_config(run.model, tokenizer), tokenizer,
                os.path.join(workdir, POLICY_DIR), base_checkpoint=run.model.hf_checkpoint)
  evaluate(run, workdir, built, tokenizer, graphdef, params,
           metrics_logs=[os.path.join(sft_dir, "metrics.jsonl"),
                         os.path.join(workdir, "rl", "metrics.jsonl")])


def data(config, workdir: str):
  """Builds (or reuses) the dataset and tokenizer; prints where and which splits."""
  run = RunConfig.from_config(config)
  built = build_data(run, workdir)
  print(json.dumps({"build_dir": str(built.dir), "splits": list(built.splits)}, indent=1))


def eval(config, workdir: str):  # noqa: A001 - the job is called "eval" in configs
  """Baselines, and the policy a finished run exported when eval.checkpoint names it."""
  run = RunConfig.from_config(config)
  built, tokenizer = prepare_data(run, workdir)
  graphdef = params = None
  logs = []
  if run.eval.checkpoint:
    mesh = sharding.mesh_from_config(run.mesh)
    graphdef, params, tokenizer = load_policy(run.eval.checkpoint, mesh, run.model.dtype)
    logs = [os.path.join(run.eval.checkpoint, sub, "metrics.jsonl") for sub in ("sft", "rl")]
  evaluate(run, workdir, built, tokenizer, graphdef, params, metrics_logs=logs)

