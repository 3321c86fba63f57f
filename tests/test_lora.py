"""LoRA: adapters against weights merged in NumPy, frozen base, dropout, SFT resume, GRPO's
reference on the same base, and export checked by transformers + peft."""
import dataclasses
import functools
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from configs import common
from deepimagine_jax import hf_import
from deepimagine_jax import lora
from deepimagine_jax import metrics_log
from deepimagine_jax import model as model_lib
from deepimagine_jax import optimizer as optimizer_lib
from deepimagine_jax import rl
from deepimagine_jax import sft
from deepimagine_jax import sharding
from deepimagine_jax import train_state
from deepimagine_jax.config import ConfigError, LoRAConfig, ModelConfig, RunConfig
import typed_configs

CFG = ModelConfig.tiny().replace(vocab_size=64, n_layers=2, mlp_dim=64)
ALL = ("q", "k", "v", "o", "gate", "up", "down")
# Declared targets; the proj -> base weight names of model.py, written out independently.
WEIGHTS = {"q": ("attn", "wq_DNH"), "k": ("attn", "wk_DKH"), "v": ("attn", "wv_DKH"),
           "o": ("attn", "wo_NHD"), "gate": ("mlp", "gate_DF"), "up": ("mlp", "up_DF"),
           "down": ("mlp", "down_FD")}


def lora_cfg(**kw) -> LoRAConfig:
  base = dataclasses.asdict(RunConfig.from_config(_rl_config()).lora)
  base.update({"rank": 4, "alpha": 8.0, **kw})
  return LoRAConfig(**base)


def _rl_config():
  from configs import rl as rl_config
  return rl_config.get_config("tiny")


def _randomize_b(params, seed=1, scale=0.5):
  """Adapters start as the identity (B = 0); random B makes every adapter matter."""
  rs = np.random.RandomState(seed)
  flat = nnx.to_flat_state(params)
  for path, v in flat:
    if path[-1] == "b":
      v.set_value(jax.device_put(rs.randn(*v.shape).astype(np.float32) * scale,
                                 v.get_value().sharding))
  return nnx.from_flat_state(flat)


def _model(mesh, lcfg, seed=0, randomize=True):
  graphdef, params = train_state.init_params(CFG, mesh, seed)
  base = jax.tree.map(np.asarray, params)
  graphdef, params = lora.attach(graphdef, params, lcfg, mesh, seed)
  return graphdef, _randomize_b(params) if randomize else params, base


def _numpy_merged(params, base, lcfg, e):
  """The base weights plus scale * A_e B_e, in NumPy."""
  flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}
  out = {p: np.asarray(v.get_value()).copy() for p, v in nnx.to_flat_state(base)}
  for i in range(CFG.n_layers):
    for t in lcfg.targets:
      sub, w = WEIGHTS[t]
      a = flat[("layers", i, sub, "lora", t, "a")][e]
      b = flat[("layers", i, sub, "lora", t, "b")][e]
      r = a.shape[-1]
      delta = (a.reshape(-1, r) @ b.reshape(r, -1)).reshape(out[("layers", i, sub, w)].shape)
      out[("layers", i, sub, w)] += lcfg.alpha / lcfg.rank * delta
  return out


def _plain_logits(flat_np):
  graphdef, state = nnx.split(nnx.eval_shape(lambda: model_lib.Transformer(CFG, nnx.Rngs(0))))
  fs = nnx.to_flat_state(state)
  for p, v in fs:
    v.set_value(jnp.asarray(flat_np[p]))
  return _logits(graphdef, nnx.from_flat_state(fs))


TOK = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (4, 8)))
POS = jnp.broadcast_to(jnp.arange(8), (4, 8))


@functools.partial(jax.jit, static_argnames="graphdef")
def _forward(params, adapter_B, graphdef):
  return nnx.merge(graphdef, params)(TOK, POS, adapter=adapter_B)[0]


def _logits(graphdef, params, adapter_B=None):
  return np.asarray(_forward(params, adapter_B, graphdef=graphdef))


def test_each_row_computes_its_adapter_as_numpy_merged_weights():
  mesh = sharding.make_mesh(2, 2, 2)
  lcfg = lora_cfg(adapters=("drug", "dose"))
  graphdef, params, base = _model(mesh, lcfg)
  rows = _logits(graphdef, params, jnp.array([0, 1, -1, 1]))
  want = [_plain_logits(_numpy_merged(params, base, lcfg, e)) for e in (0, 1)]
  base_logits = _plain_logits({p: v.get_value() for p, v in nnx.to_flat_state(base)})
  for row, ref in zip(range(4), (want[0], want[1], base_logits, want[1])):
    np.testing.assert_allclose(rows[row], ref[row], atol=2e-5, rtol=1e-5)
  assert np.abs(want[0] - base_logits).max() > 1e-2  # the adapters do something
  # The active adapter serves a call without `adapter`; lora.merged folds it in.
  model = nnx.merge(graphdef, params)
  model.active_adapter = 1
  np.testing.assert_allclose(_logits(*nnx.split(model)), want[1], atol=2e-5, rtol=1e-5)
  merged = lora.merged(nnx.merge(graphdef, params), 1)
  assert merged.lora_cfg is None and not jax.tree.leaves(nnx.state(merged, lora.LoRAParam))
  for p, v in nnx.to_flat_state(nnx.state(merged)):
    np.testing.assert_allclose(np.asarray(v.get_value()),
                               _numpy_merged(params, base, lcfg, 1)[p], atol=1e-6, rtol=1e-6)


def _scanned(params, lcfg, mesh):
  """The scanned layout's (graphdef, params) holding the unrolled `params`, stacked by layer."""
  graphdef, scanned = train_state.init_params(CFG.replace(scan_layers=True), mesh, 0)
  graphdef, scanned = lora.attach(graphdef, scanned, lcfg, mesh, 0)
  unrolled = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}
  flat = nnx.to_flat_state(scanned)
  for path, v in flat:
    if path[0] == "layers":
      v.set_value(jnp.stack([unrolled[("layers", i, *path[1:])] for i in range(CFG.n_layers)]))
    else:
      v.set_value(jnp.asarray(unrolled[path]))
  return graphdef, nnx.from_flat_state(flat)


def test_each_token_computes_its_adapter_in_packed_rows():
  """[B, T] adapter ids (packed rows mixing adapters): every segment's logits are those of
  its adapter's merged weights run on the segment alone, in both layer layouts."""
  mesh = sharding.make_mesh(-1, 1, 1)
  lcfg = lora_cfg(adapters=("drug", "dose", "outcome"))
  graphdef, params, base = _model(mesh, lcfg)
  seg = np.array([[1, 1, 1, 2, 2, 2, 2, 3], [1, 1, 1, 1, 1, 2, 2, 3]] * 2)
  ids = np.array([[2, 2, 2, 0, 0, 0, 0, -1], [1, 1, 1, 1, 1, -1, -1, 0]] * 2)
  pos = np.concatenate([np.arange(n) for row in seg for n in np.unique(row, return_counts=True)[1]]
                       ).reshape(seg.shape)

  @functools.partial(jax.jit, static_argnames="graphdef")
  def packed(params, graphdef):
    return nnx.merge(graphdef, params)(TOK, jnp.asarray(pos), segment_ids_BT=jnp.asarray(seg),
                                       adapter=jnp.asarray(ids, jnp.int32))[0]

  flat_base = {p: v.get_value() for p, v in nnx.to_flat_state(base)}
  want = {e: _numpy_merged(params, base, lcfg, e) for e in (0, 1, 2)}
  want[-1] = flat_base
  got = np.asarray(packed(params, graphdef=graphdef))
  graphdef0, state0 = nnx.split(nnx.eval_shape(lambda: model_lib.Transformer(CFG, nnx.Rngs(0))))
  for b in range(2):
    for s in np.unique(seg[b]):
      cols = np.flatnonzero(seg[b] == s)
      e = int(ids[b, cols[0]])
      fs = nnx.to_flat_state(state0)
      for p, v in fs:
        v.set_value(jnp.asarray(want[e][p]))
      alone = np.asarray(jax.jit(lambda prm, t: nnx.merge(graphdef0, prm)(
          t, jnp.arange(len(cols))[None])[0])(nnx.from_flat_state(fs),
                                              jnp.asarray(TOK)[b:b + 1, cols]))
      np.testing.assert_allclose(got[b, cols], alone[0], atol=2e-5, rtol=1e-5,
                                 err_msg=f"row {b} segment {s} adapter {e}")
  # The scanned layout reads the same ids the same way.
  scan_gd, scan_params = _scanned(params, lcfg, mesh)
  np.testing.assert_allclose(np.asarray(packed(scan_params, graphdef=scan_gd)), got,
                             atol=2e-5, rtol=1e-5)


def test_new_adapters_are_the_identity_and_rank_zero_changes_nothing():
  mesh = sharding.make_mesh(-1, 1, 1)
  graphdef, params = train_state.init_params(CFG, mesh, 0)
  same = lora.attach(graphdef, params, lora_cfg(rank=0), mesh, 0)
  assert same[0] is graphdef and same[1] is params
  trainable, frozen = lora.partition(params)
  assert trainable is params and not jax.tree.leaves(frozen)
  g2, p2 = lora.attach(graphdef, params, lora_cfg(), mesh, 0)
  np.testing.assert_array_equal(_logits(g2, p2), _logits(graphdef, params))
  # The base arrays are the same objects (no copy), the base graph unchanged.
  assert all(a is b for a, b in zip(jax.tree.leaves(lora.partition(p2)[1]),
                                    jax.tree.leaves(params)))


def test_only_adapters_train_and_reach_the_optimizer():
  mesh = sharding.make_mesh(2, 2, 2)
  graphdef, params, _ = _model(mesh, lora_cfg(targets=("q", "down")))
  trainable, frozen = lora.partition(params)
  paths = [p for p, _ in nnx.to_flat_state(trainable)]
  assert {(p[2], p[4], p[5]) for p in paths} == {("attn", "q", "a"), ("attn", "q", "b"),
                                                 ("mlp", "down", "a"), ("mlp", "down", "b")}
  assert all(isinstance(v, nnx.Param) for _, v in nnx.to_flat_state(frozen))
  # Adapters are sharded like the weight they update (q: embed on fsdp, heads on tensor),
  # B's rank over fsdp (free there); A's rank stays whole (fsdp holds its embed axis).
  ad = trainable["layers"][0]["attn"]["lora"]["q"]
  assert ad["b"].get_value().sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor",
                                                                         None)
  assert ad["a"].get_value().sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  down_b = trainable["layers"][0]["mlp"]["lora"]["down"]["b"].get_value()  # out: embed
  assert down_b.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  tx, _ = optimizer_lib.make_optimizer(typed_configs.optimizer(4))
  state, _ = train_state.state_from_params(trainable, tx, mesh, 0)
  n_adapter = sum(x.size for x in jax.tree.leaves(trainable))
  n_moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert n_moments == 2 * n_adapter  # Adam's m and v, of the adapters alone


def test_dropout_is_inverted_and_training_only():
  lcfg = lora_cfg(rank=8, dropout=0.25, adapters=("x",))
  ad = lora.Adapter(lcfg, "D", "D", "w", {"D": 8}, {"D": None}, nnx.Rngs(0))
  ad.a.set_value(jnp.eye(8)[None])
  ad.b.set_value(jnp.eye(8)[None] / lcfg.scale)  # the update is dropout(x) itself
  x = jnp.ones((4, 2000, 8))
  y = np.asarray(ad(x, jnp.asarray(0), jax.random.key(3)))
  assert np.all((y == 0) | np.isclose(y, 1 / 0.75))
  assert abs((y == 0).mean() - 0.25) < 0.01
  np.testing.assert_array_equal(y, np.asarray(ad(x, jnp.asarray(0), jax.random.key(3))))
  assert (y != np.asarray(ad(x, jnp.asarray(0), jax.random.key(4)))).any()
  np.testing.assert_allclose(np.asarray(ad(x, jnp.asarray(0), None)), 1.0, rtol=1e-6)


def _rows(n, seed=0, T=16):
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    ids = rng.integers(4, CFG.vocab_size, size=T + 1).astype(np.int32)
    rows.append({"inputs": ids[:-1], "targets": ids[1:],
                 "loss_mask": (np.arange(T) >= T // 2).astype(np.float32),
                 "positions": np.arange(T, dtype=np.int32), "segment_ids": np.ones(T, np.int32)})
  return rows


def _batches(rows, batch_size):
  return iter(grain.MapDataset.source(rows).shuffle(seed=0).repeat(None).batch(batch_size))


def _sft(mesh, workdir, steps, stop_after=None):
  graphdef, params, base = _model(mesh, lora_cfg(dropout=0.1), randomize=False)
  opt = typed_configs.optimizer(steps, learning_rate=1e-2, warmup_steps=0, weight_decay=0.0)
  cfg = typed_configs.sft(steps, 4, opt, checkpoint_every=2, log_every=1000)
  state = sft.run_sft(cfg, mesh, graphdef, params, _batches(_rows(8), 4), str(workdir), seed=0,
                      stop_after=stop_after)
  return state, lora.partition(params)[1], base


def test_sft_trains_adapters_with_dropout_and_resumes_exactly(tmp_path):
  mesh = sharding.make_mesh(2, 2, 2)
  full, frozen, base = _sft(mesh, tmp_path / "a", 5)
  _sft(mesh, tmp_path / "b", 5, stop_after=3)  # killed in step 3; newest checkpoint: step 2
  resumed, _, _ = _sft(mesh, tmp_path / "b", 5)
  assert int(resumed.step) == 5
  for a, b in zip(jax.tree.leaves((full.params, full.opt_state)),
                  jax.tree.leaves((resumed.params, resumed.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The state is the adapters; the base is untouched.
  assert all(p[-3] == "lora" for p, _ in nnx.to_flat_state(full.params))
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(base)):
    np.testing.assert_array_equal(np.asarray(a), b)
  losses = [r["loss"] for r in metrics_log.read_metrics(tmp_path / "a" / "metrics.jsonl")]
  assert losses[-1] < losses[0]


def test_sft_step_rank_zero_equals_the_full_fine_tune():
  """With no adapters the step is today's: the same update as merging params alone."""
  mesh = sharding.make_mesh(-1, 1, 1)
  graphdef, params = train_state.init_params(CFG, mesh, 0)
  tx, _ = optimizer_lib.make_optimizer(typed_configs.optimizer(4, warmup_steps=0))
  rows = _rows(4)
  batch = {k: jnp.stack([r[k] for r in rows]) for k in rows[0]}
  state, _ = train_state.state_from_params(params, tx, mesh, 0)
  # jitted: eager, every op of the model compiles on its own (tens of seconds)
  step = jax.jit(functools.partial(sft.train_step, graphdef=graphdef, tx=tx, accum_steps=1))
  new, metrics = step(state, batch, lora.partition(params)[1])
  loss_sum, n = jax.jit(sft.masked_nll_sum, static_argnums=1)(params, graphdef, batch)
  assert float(metrics["loss"]) == pytest.approx(float(loss_sum / n), rel=1e-6)
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
           for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(params))]
  assert min(moved) > 0  # every weight trains


def test_per_row_adapter_key_in_the_sft_step():
  """Rows of adapter 1 train adapter 1 only; adapter 0 gets no gradient from them."""
  mesh = sharding.make_mesh(-1, 1, 1)
  graphdef, params, _ = _model(mesh, lora_cfg(adapters=("a0", "a1")))
  trainable, frozen = lora.partition(params)
  rows = _rows(2)
  batch = {k: jnp.stack([r[k] for r in rows]) for k in rows[0]}
  batch[sft.ADAPTER_KEY] = jnp.array([1, 1], jnp.int32)
  grads = jax.jit(jax.grad(lambda p: sft.masked_nll_sum(p, graphdef, batch, frozen)[0]))(
      trainable)
  g = grads["layers"][0]["attn"]["lora"]["q"]["b"].get_value()
  assert np.abs(np.asarray(g[0])).max() == 0 and np.abs(np.asarray(g[1])).max() > 0


def test_grpo_reference_is_the_base_on_the_same_arrays():
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  graphdef, params, base = _model(mesh, lora_cfg())
  cfg = typed_configs.rl(2, None, prompts_per_step=2, group_size=2, max_new_tokens=3, beta=0.1)
  tx, _ = optimizer_lib.make_optimizer(cfg.optimizer)
  trainable, frozen = lora.partition(params)
  state, state_sh = train_state.state_from_params(trainable, tx, mesh, 0)
  trainer = rl.GRPOTrainer(graphdef, tx, cfg, mesh, state_sh, params, rewards_balance(), frozen)
  assert trainer.ref_params is None  # no second copy of the weights
  prompts = jnp.asarray(np.random.RandomState(1).randint(4, CFG.vocab_size, (2, 5)))
  pmask = jnp.ones((2, 5), jnp.int32)
  comp = jnp.asarray(np.random.RandomState(2).randint(4, CFG.vocab_size, (4, 3)))
  ref = trainer.ref_logprobs(lora.combine(state.params, frozen), prompts, pmask, comp)
  base_gd, base_params = nnx.split(model_lib.Transformer(CFG, nnx.Rngs(0)))
  base_params = jax.tree.map(jnp.asarray, base)
  want = jax.jit(functools.partial(rl.completion_logprobs, graphdef=base_gd, group_size=2,
                                   temperature=cfg.temperature))(base_params, prompts, pmask,
                                                                 comp)
  np.testing.assert_allclose(np.asarray(ref), np.asarray(want), atol=2e-6, rtol=1e-6)
  policy = trainer.logprobs(lora.combine(state.params, frozen), prompts, pmask, comp)
  assert np.abs(np.asarray(policy) - np.asarray(want)).max() > 1e-3


def rewards_balance():
  from deepimagine_jax import rewards
  return rewards.ClassBalance.of([0, 1], [2, 2])


def test_config_section_is_declared_and_checked():
  run = RunConfig.from_config(_rl_config())
  assert run.lora.rank == 0 and run.lora.targets == ALL  # off by default
  for key, value, words in (("rank", -1, "lora.rank"), ("dropout", 1.0, "lora.dropout"),
                            ("targets", ("q", "qkv"), "lora.targets"),
                            ("adapters", ("a", "a"), "lora.adapters")):
    c = _rl_config()
    c.lora.rank = 8
    c.lora[key] = value
    with pytest.raises(ConfigError, match=f"config.{words}="):
      RunConfig.from_config(c)
  with pytest.raises(ValueError, match="no LoRA adapter 'nope'"):
    lora.adapter_index(lora_cfg(), "nope")
  assert common.lora().rank == 0
  for route, adapters, words in (("by_hand", ("a",), "lora.route"),
                                 ("factor", ("general",), "lora.adapters"),
                                 ("factor", ("general", "colour"), "lora.adapters"),
                                 ("factor", ("dose", "outcome"), "lora.adapters")):
    c = _rl_config()
    c.lora.rank, c.lora.route, c.lora.adapters = 8, route, adapters
    with pytest.raises(ConfigError, match=f"config.{words}="):
      RunConfig.from_config(c)


def test_route_picks_the_factors_adapter_else_the_general_one():
  cfg = lora_cfg(adapters=("general", "dose", "outcome"), route="factor")
  assert [lora.route(cfg, p) for p in ("dose", "outcome", "", "population", "dose+outcome")] \
      == [1, 2, 0, 0, 0]
  assert lora.route(lora_cfg(adapters=("general", "dose")), "dose") == 0  # route "active"


def test_routed_packed_batch_trains_only_the_adapters_its_examples_name(tmp_path):
  """Packed rows mixing 'dose' and general examples: 'dose' and 'general' get gradients,
  'outcome' (no example) none; the SFT job's counts say so."""
  from data_pipeline import grain_pipeline as gp
  from data_pipeline.example import Example
  from deepimagine_jax import jobs
  mesh = sharding.make_mesh(-1, 1, 1)
  lcfg = lora_cfg(adapters=("general", "dose", "outcome"), route="factor")
  graphdef, params, _ = _model(mesh, lcfg)
  recs = [Example(id=f"e{i}", source="synthetic", kind="natural_pair", trial_id=f"t{i}",
                  options=("up", "down"), label=i % 2,
                  perturbation=("dose", "", "dose+outcome")[i % 3],
                  prompt=f"example {i} dose", completion=f"DECISION: ({i % 2}, {1 - i % 2})")
          for i in range(12)]

  class Tok:  # words -> ids below the tiny vocabulary; what sft_tokens asks of a tokenizer
    ids = staticmethod(lambda text: [4 + sum(map(ord, w)) % (CFG.vocab_size - 4)
                                     for w in text.split()])
    prompt_ids = staticmethod(lambda text: ([1], Tok.ids(text)))
    completion_ids = staticmethod(lambda text: Tok.ids(text) + [2])

  tok = Tok()
  assert jobs.write_adapter_counts(lcfg, recs, str(tmp_path)) == {"general": 8, "dose": 4,
                                                                    "outcome": 0}
  assert json.loads((tmp_path / "sft_adapters.json").read_text())["dose"] == 4
  batch = next(gp.make_sft_iterator(recs, tok, seq_len=48, global_batch_size=2, seed=0,
                                    pack=True, shard_index=0, shard_count=1,
                                    route=jobs.adapter_route(lcfg)))
  assert len(set(batch[gp.ADAPTER_KEY][batch["segment_ids"] > 0].tolist())) == 2  # mixed rows
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  trainable, frozen = lora.partition(params)
  grads = jax.jit(jax.grad(lambda p: sft.masked_nll_sum(p, graphdef, batch, frozen)[0]))(
      trainable)
  g = np.abs(np.asarray(grads["layers"][1]["mlp"]["lora"]["down"]["b"].get_value()))
  assert g[0].max() > 0 and g[1].max() > 0 and g[2].max() == 0


def test_routed_rollout_samples_and_scores_each_prompt_with_its_adapter():
  """The sampler's log-probs of a routed rollout equal the trainer's forward with each
  prompt's adapter made the active one; the reference stays the base."""
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  lcfg = lora_cfg(adapters=("general", "dose", "outcome"), route="factor")
  graphdef, params, base = _model(mesh, lcfg)
  cfg = typed_configs.rl(2, None, prompts_per_step=3, group_size=2, max_new_tokens=4, beta=0.1)
  tx, _ = optimizer_lib.make_optimizer(cfg.optimizer)
  trainable, frozen = lora.partition(params)
  state, state_sh = train_state.state_from_params(trainable, tx, mesh, 0)
  trainer = rl.GRPOTrainer(graphdef, tx, cfg, mesh, state_sh, params, rewards_balance(), frozen,
                           routed=lora.routed_config(graphdef, params) is not None)
  prompts = np.random.RandomState(1).randint(4, CFG.vocab_size, (3, 5)).astype(np.int32)
  prompt_batch = {"prompt_tokens": prompts, "prompt_mask": np.ones((3, 5), np.int32),
                  "labels": [0, 1, 0], "n_options": [2, 2, 2],
                  rl.ADAPTER_KEY: np.array([2, 0, 1], np.int32)}

  class Tok:
    eos_id, pad_id = 1, 0
    decode = staticmethod(lambda ids: " ".join(map(str, ids)))

  batch, _, _ = trainer.rollout(state.params, prompt_batch, jax.random.key(3), Tok())
  np.testing.assert_array_equal(np.asarray(batch[rl.ADAPTER_KEY]), [2, 0, 1])
  comp, mask = np.asarray(batch["completions"]), np.asarray(batch["completion_mask"])
  for q, e in enumerate((2, 0, 1)):
    model = nnx.merge(graphdef, params)
    model.active_adapter = e
    want = jax.jit(functools.partial(rl.completion_logprobs, graphdef=nnx.split(model)[0],
                                     group_size=2, temperature=cfg.temperature))(
        params, jnp.asarray(prompts[q:q + 1]), jnp.ones((1, 5), jnp.int32),
        jnp.asarray(comp[2 * q:2 * q + 2]))
    rows = slice(2 * q, 2 * q + 2)
    np.testing.assert_allclose(np.asarray(batch["old_logprobs"])[rows] * mask[rows],
                               np.asarray(want) * mask[rows], atol=2e-5, rtol=1e-5)
  base_gd = nnx.split(model_lib.Transformer(CFG, nnx.Rngs(0)))[0]
  ref = jax.jit(functools.partial(rl.completion_logprobs, graphdef=base_gd, group_size=2,
                                  temperature=cfg.temperature))(
      jax.tree.map(jnp.asarray, base), jnp.asarray(prompts), jnp.ones((3, 5), jnp.int32),
      jnp.asarray(comp))
  np.testing.assert_allclose(np.asarray(batch["ref_logprobs"]) * mask, np.asarray(ref) * mask,
                             atol=2e-5, rtol=1e-5)
  new_state, aux = trainer.update(state, batch)  # the update reads the adapters too
  assert float(aux["logprob_gap"]) < 1e-4


# Export, checked by transformers and peft on random models -----------------------

_SHAPE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, intermediate_size=96)
CASES = {
    "qwen3": lambda: transformers.Qwen3Config(**_SHAPE, tie_word_embeddings=False),
    "llama": lambda: transformers.LlamaConfig(**_SHAPE),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **_SHAPE, query_pre_attn_scalar=24, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"]),
}


@pytest.mark.parametrize("case,scan", [(c, False) for c in CASES] + [("gemma3", True)])
def test_merged_and_peft_exports_match_transformers(case, scan, tmp_path):
  import peft
  torch.manual_seed(0)
  hf = transformers.AutoModelForCausalLM.from_config(CASES[case]()).float().eval()
  with torch.no_grad():  # O(1) weights, so a mapping slip moves the logits
    for name, p in hf.named_parameters():
      if not name.endswith("norm.weight"):
        p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
  hf.save_pretrained(tmp_path / "base")
  mesh = sharding.make_mesh(-1, 2, 2)
  cfg, model = hf_import.load_hf_checkpoint(tmp_path / "base", mesh, scan_layers=scan)
  lcfg = lora_cfg(targets=ALL if case != "llama" else ("q", "v", "down"),
                  adapters=("first", "second"))
  graphdef, params = lora.attach(*nnx.split(model), lcfg, mesh, 0)
  model = nnx.merge(graphdef, _randomize_b(params, scale=0.3))
  tok = np.random.RandomState(3).randint(0, _SHAPE["vocab_size"], (2, 12))
  pos = jnp.broadcast_to(jnp.arange(12), tok.shape)
  ours = np.asarray(model(jnp.asarray(tok), pos, adapter=jnp.array([1, 1]))[0])
  with torch.no_grad():
    assert np.abs(hf(torch.tensor(tok)).logits.numpy() - ours).max() > 1e-2

  hf_import.export_peft_adapter(model, cfg, tmp_path / "peft", adapter="second")
  with torch.no_grad():
    peft_logits = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()(
        torch.tensor(tok)).logits.numpy()
  np.testing.assert_allclose(peft_logits, ours, atol=2e-5, rtol=1e-5)

  model.active_adapter = 1  # the export merges the active adapter: what the model computes
  hf_import.export_hf_checkpoint(model, cfg, tmp_path / "merged")
  loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
  with torch.no_grad():
    merged_logits = loaded(torch.tensor(tok)).logits.numpy()
  np.testing.assert_allclose(merged_logits, ours, atol=2e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="no LoRA adapter 'third'"):
    hf_import.export_hf_checkpoint(model, cfg, tmp_path / "x", adapter="third")


# The whole job with LoRA on a checkpoint folder transformers wrote -------------------


def _checkpoint_folder(arch: str, folder):
  """A random transformers checkpoint with tokenizer files built here: Gemma 3 with a
  Gemma-style SentencePiece model, Qwen3 / Llama-3 with a byte-level BPE tokenizer.json."""
  import tokenizer_files
  from data_pipeline import synthetic
  texts = [e.prompt + "\n" + e.completion for e in synthetic.make_synthetic(200, 0)]
  torch.manual_seed(0)
  if arch == "gemma3":
    tokenizer_files.gemma_sentencepiece(folder, texts, vocab_size=400)
    config = transformers.Gemma3TextConfig(
        **{**_SHAPE, "vocab_size": 400}, query_pre_attn_scalar=16, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"])
  else:
    tokenizer_files.byte_level_bpe(folder, texts, "qwen" if arch == "qwen3" else "llama3",
                                   vocab_size=400)
    config = CASES["qwen3" if arch == "qwen3" else "llama"]()
    config.vocab_size = 512  # the BPE's ids and its special tokens fit below
  transformers.AutoModelForCausalLM.from_config(config).float().save_pretrained(folder)
  return config.vocab_size


@pytest.mark.slow  # about 45 s each: the whole main job on a checkpoint folder
@pytest.mark.parametrize("arch", ["gemma3", "qwen3", "llama3"])
def test_rl_job_with_lora_on_a_checkpoint(tmp_path, arch):
  """configs/rl.py:tiny on a random Gemma 3 / Qwen3 / Llama-3 checkpoint with its tokenizer
  files: data, SFT, GRPO, eval, and exports (merged; PEFT) that transformers and peft read
  as the same policy.

  Qwen3 and Llama-3 run with lora.route 'factor' (adapters general, dose, outcome): the
  synthetic examples (all 'dose') train and sample with 'dose'; 'general' and 'outcome'
  see none (sft_adapters.json) and stay the identity (B = 0); packed rows take the
  per-token path. load_policy rebuilds the routed policy (base + every PEFT adapter), and
  each adapter's logits are those of peft loading it onto the transformers base."""
  import peft
  from safetensors.numpy import load_file
  from configs import rl as rl_config
  from deepimagine_jax import jobs
  folder = tmp_path / arch
  vocab = _checkpoint_folder(arch, folder)
  routed = arch != "gemma3"
  c = rl_config.get_config("tiny")
  c.model.hf_checkpoint = str(folder)
  c.lora.update(rank=4, alpha=8.0, dropout=0.1)
  if routed:
    c.lora.update(adapters=("general", "dose", "outcome"), route="factor")
    c.data.pack = True
  # :tiny's 48-token prompts hold no CT Open question: 160 holds ~500 of the eval split.
  c.data.seq_len, c.data.prompt_len = 176, 160
  c.sft.optimizer.learning_rate = 1e-2
  run = tmp_path / "run"
  jobs.rl(c, str(run))

  assert [r["step"] for r in metrics_log.read_metrics(run / "rl" / "metrics.jsonl")] == [1, 2, 3]
  assert "model_score" in json.loads((run / "summary.json").read_text())
  tok = np.random.RandomState(0).randint(0, vocab, (2, 10))
  pos = jnp.broadcast_to(jnp.arange(10), tok.shape)

  def hf_logits(adapter=None):
    with torch.no_grad():
      m = transformers.AutoModelForCausalLM.from_pretrained(
          run / "policy" if adapter is None and not routed else folder).float().eval()
      if adapter is not None:
        m = peft.PeftModel.from_pretrained(m, str(run / "policy" / "adapters" / adapter)).eval()
      return m(torch.tensor(tok)).logits.numpy()

  graphdef, params, _ = jobs.load_policy(str(run), sharding.make_mesh(-1, 1, 1), "float32")
  model = nnx.merge(graphdef, params)
  with torch.no_grad():
    base = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    base_logits = base(torch.tensor(tok)).logits.numpy()
  if not routed:
    merged_logits = hf_logits()
    np.testing.assert_allclose(merged_logits, hf_logits("default"), atol=2e-5, rtol=1e-5)
    ours = np.asarray(nnx.jit(lambda m: m(jnp.asarray(tok), pos)[0])(model))
    np.testing.assert_allclose(ours, merged_logits, atol=2e-5, rtol=1e-5)
    assert np.abs(base_logits - merged_logits).max() > 1e-3  # training moved the policy
    return
  counts = json.loads((run / "sft" / "sft_adapters.json").read_text())
  assert counts["dose"] > 0 and counts["general"] == counts["outcome"] == 0
  assert model.lora_cfg.route == "factor" and model.lora_cfg.adapters[1] == "dose"
  for e, name in enumerate(model.lora_cfg.adapters):
    w = load_file(str(run / "policy" / "adapters" / name / "adapter_model.safetensors"))
    moved = max(np.abs(v).max() for k, v in w.items() if "lora_B" in k) > 0
    assert moved == (name == "dose"), name
    model.active_adapter = e
    ours = np.asarray(nnx.jit(lambda m: m(jnp.asarray(tok), pos)[0])(model))
    want = hf_logits(name)
    np.testing.assert_allclose(ours, want, atol=2e-5, rtol=1e-5, err_msg=name)
    if name == "dose":
      assert np.abs(base_logits - want).max() > 1e-3


def test_a_routed_policy_without_its_base_is_one_clear_error(tmp_path):
  from deepimagine_jax import jobs
  d = tmp_path / "policy"
  d.mkdir()
  (d / jobs.ROUTED_LORA_FILE).write_text(json.dumps(
      {"lora": dataclasses.asdict(lora_cfg(adapters=("general", "dose"), route="factor")),
       "base_checkpoint": ""}))
  with pytest.raises(FileNotFoundError, match="routed_lora.json: adapters routed by factor "
                     "need the base checkpoint.*the run started from random weights"):
    jobs.load_policy(str(tmp_path), sharding.make_mesh(-1, 1, 1), "float32")
