"""bench/memory.py: its per-device bytes against live arrays' shards and a hand count."""
import dataclasses
import importlib.util

import jax
import numpy as np

from configs import rl as rl_config
from deepimagine_jax import lora
from deepimagine_jax import sharding
from deepimagine_jax import train_state
from deepimagine_jax.config import RunConfig
from deepimagine_jax.optimizer import make_optimizer
from conftest import REPO

_spec = importlib.util.spec_from_file_location("memory_plan", REPO / "bench" / "memory.py")
memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory)


def _run(**lora_kw):
  c = rl_config.get_config("tiny")
  c.mesh.fsdp, c.mesh.tensor = 2, 2
  c.lora.update(lora_kw)
  return RunConfig.from_config(c)


def _live_bytes(tree) -> int:
  return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def test_parameter_and_optimizer_bytes_are_the_live_shards():
  run = _run(rank=4, alpha=8.0)
  mesh = sharding.mesh_from_config(run.mesh)
  cfg = memory.model_config(run)
  _, trainable, frozen = memory.abstract_params(cfg, run, mesh)
  graphdef, params = train_state.init_params(cfg, mesh, 0)
  live_trainable, live_frozen = lora.partition(lora.attach(graphdef, params, run.lora, mesh, 0)[1])
  assert memory.device_bytes(frozen) == _live_bytes(live_frozen) > 0
  assert memory.device_bytes(trainable) == _live_bytes(live_trainable) > 0
  tx, _ = make_optimizer(run.sft.optimizer)
  state, _ = train_state.state_from_params(live_trainable, tx, mesh, 0)
  opt = memory.optimizer_state(trainable, run.sft.optimizer, mesh)[1]
  assert memory.device_bytes(opt) == _live_bytes(state.opt_state)


def test_kv_cache_by_hand():
  run = _run()
  mesh = sharding.mesh_from_config(run.mesh)  # data 2 x fsdp 2 x tensor 2
  cfg = memory.model_config(run)
  r = run.rl
  # Rows over data*fsdp (4); the tiny model's 2 kv heads over tensor (2); float32 k and v.
  per_slot = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4 // 2
  # The samples' own new slots, and each prompt's slots once (sampler's SharedPrefixCache).
  slots = (r.prompts_per_step * r.group_size * r.max_new_tokens
           + r.prompts_per_step * run.data.prompt_len)
  assert memory.kv_cache_bytes(cfg, run, mesh) == per_slot * slots // 4


def test_reference_copy_only_without_lora_and_with_kl():
  full = _run()
  mesh = sharding.mesh_from_config(full.mesh)
  _, trainable, _ = memory.abstract_params(memory.model_config(full), full, mesh)
  assert full.rl.beta > 0 and not full.lora.rank
  assert memory.reference_bytes(full, trainable) == memory.device_bytes(trainable) > 0
  no_kl = dataclasses.replace(full, rl=dataclasses.replace(full.rl, beta=0.0))
  assert memory.reference_bytes(no_kl, trainable) == 0
  adapters = _run(rank=4, alpha=8.0)
  _, trainable, _ = memory.abstract_params(memory.model_config(adapters), adapters, mesh)
  assert memory.reference_bytes(adapters, trainable) == 0


def test_plan_peak_is_the_largest_phase():
  run = _run(rank=4, alpha=8.0)
  p = memory.plan(run, sharding.mesh_from_config(run.mesh), None)
  resident = p["params_frozen"] + p["params_trained"] + p["optimizer"]
  assert p["params_reference"] == 0  # LoRA: the reference is the base, adapters off
  phases = {"sft": p["activations_sft"], "rl_update": p["activations_rl_update"],
            "rl_rollout": p["kv_cache"]}
  assert min(phases.values()) > 0
  assert p["peak"] == resident + max(phases.values())
  assert p["peak_phase"] == max(phases, key=phases.get)
  text = memory.table(p, [1e-9, 16])
  assert "fits (peak <= 90%): 1e-09 GiB NO, 16 GiB yes" in text
  np.testing.assert_equal(p["devices"], 8)


def test_remat_keeps_one_residual_and_the_weight_gradients_per_layer():
  """With remat a layer adds its input (the residual remat keeps) and its weight gradients,
  by hand; without, all of its activations; neither SFT nor the GRPO update (whose forward
  runs through a KV cache) grows faster than linearly in depth."""
  def growth(remat):
    c = rl_config.get_config("tiny")
    c.model.remat = remat
    c.model.scan_layers = True
    c.data.seq_len = c.data.prompt_len = 128
    run = RunConfig.from_config(c)
    if not remat:  # only SFT's figure is compared
      run = dataclasses.replace(run, rl=None)
    mesh = sharding.mesh_from_config(run.mesh)
    cfg = memory.model_config(run)
    t = [memory.step_temp_bytes(memory._layers(cfg, n), run, mesh)
         for n in ((4, 8, 12) if remat else (4, 8))]
    return cfg, run, mesh, {k: [b[k] - a[k] for a, b in zip(t, t[1:])] for k in t[0]}

  cfg, run, mesh, with_remat = growth(True)
  _, _, _, without = growth(False)
  B = run.sft.global_batch_size // (mesh.shape["data"] * mesh.shape["fsdp"])
  residual = B * run.data.seq_len * cfg.d_model * 4
  _, trainable, _ = memory.abstract_params(memory._layers(cfg, 1), run, mesh)
  _, trainable2, _ = memory.abstract_params(memory._layers(cfg, 2), run, mesh)
  layer_grads = memory.device_bytes(trainable2) - memory.device_bytes(trainable)
  per_layer = with_remat["sft"][1] / 4
  assert residual <= per_layer <= 1.5 * (residual + layer_grads), (per_layer, residual,
                                                                   layer_grads)
  assert without["sft"][0] / 4 > 2 * per_layer
  for k in ("sft", "rl_update"):
    first, second = with_remat[k]
    assert second <= 1.25 * first, (k, first, second)  # linear, not quadratic, in depth
