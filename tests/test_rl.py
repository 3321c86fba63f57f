"""GRPO loop: trainer/sampler log-prob agreement, updates per rollout, exact resume."""
import dataclasses

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepimagine_jax import grpo
from deepimagine_jax import metrics_log
from deepimagine_jax import model as model_lib
from deepimagine_jax import optimizer as optimizer_lib
from deepimagine_jax import rewards
from deepimagine_jax import rl
from deepimagine_jax import sampler
from deepimagine_jax import sharding
from deepimagine_jax import train_state
from deepimagine_jax.config import ModelConfig
import typed_configs
from deepimagine_jax import prefix

CFG = ModelConfig.tiny().replace(vocab_size=48, n_layers=1, tie_embeddings=False)
P = 8
BALANCE = rewards.ClassBalance.of([0, 1], [2, 2])  # _prompts alternates the two labels


class _Tok:
  """Just enough tokenizer for the loop: ids <-> a DECISION line over two digits."""
  pad_id, bos_id, eos_id, vocab_size = 0, 2, 3, CFG.vocab_size

  def decode(self, ids):
    return "DECISION: ({}, {})".format(*(i % 2 for i in (list(ids) + [0, 0])[:2]))


def _prompts(n=16, seed=0):
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    length = int(rng.integers(3, P + 1))
    tok = np.zeros(P, np.int32)
    tok[P - length:] = rng.integers(4, CFG.vocab_size, size=length)
    mask = (tok > 0).astype(np.int32)
    rows.append({"prompt_tokens": tok, "prompt_mask": mask, "labels": i % 2, "n_options": 2,
                 "example_ids": f"ex{i}"})
  return rows


def _iterator(rows, batch):
  def stack(xs):
    return {"prompt_tokens": np.stack([x["prompt_tokens"] for x in xs]),
            "prompt_mask": np.stack([x["prompt_mask"] for x in xs]),
            "labels": [x["labels"] for x in xs], "n_options": [x["n_options"] for x in xs],
            "example_ids": [x["example_ids"] for x in xs]}
  ds = grain.MapDataset.source(rows).shuffle(seed=0).repeat(None)
  return iter(ds.batch(batch, batch_fn=stack))


def _naive_logprobs(params, graphdef, prompts, pmask, completions, G, temperature):
  """Reference: repeat each prompt G times and run every full sequence separately."""
  model = nnx.merge(graphdef, params)
  prompts, pmask = jnp.repeat(prompts, G, 0), jnp.repeat(pmask, G, 0)
  seq = jnp.concatenate([prompts, completions], 1)
  valid = jnp.concatenate([pmask, jnp.ones_like(completions)], 1)
  pos = jnp.maximum(jnp.cumsum(valid, 1) - 1, 0)
  logits, _ = model(seq[:, :-1], pos[:, :-1], segment_ids_BT=valid[:, :-1])
  logp = jax.nn.log_softmax(logits[:, P - 1:] / temperature, -1)
  return jnp.take_along_axis(logp, completions[..., None], -1)[..., 0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trainer_logprobs_equal_sampler_logprobs(temperature):
  model = model_lib.Transformer(CFG, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  rows = _prompts(4)
  prompts = jnp.stack([r["prompt_tokens"] for r in rows])
  mask = jnp.stack([r["prompt_mask"] for r in rows])
  out = sampler.sample(graphdef, params, prompts, mask, jax.random.key(1), max_new_tokens=6,
                       temperature=temperature, eos_id=5, group_size=3)
  assert out.tokens.shape == (12, 6)
  # Jitted as the trainer runs it (op by op, this forward took most of the test's time).
  logits = jax.jit(lambda p, t: prefix.continuation_logits(
      nnx.merge(graphdef, p), prompts, mask, t, group_size=3, temperature=temperature))(
          params, out.tokens)
  logp = grpo.logprobs_from_logits(logits, out.tokens)
  m = np.asarray(out.completion_mask) > 0
  np.testing.assert_allclose(np.asarray(logp)[m], np.asarray(out.logprobs)[m], atol=1e-4)
  assert float(grpo.token_entropy(logits, out.completion_mask)) >= 0
  # The G samples of one prompt differ (they are not copies of one sample).
  assert len({tuple(r) for r in np.asarray(out.tokens[:3]).tolist()}) > 1


def test_shared_prefix_forward_and_grads_equal_full_sequences():
  """The shared-prompt path is exact: same log-probs and same parameter gradients."""
  model = model_lib.Transformer(CFG, nnx.Rngs(2))
  graphdef, params = nnx.split(model)
  rows = _prompts(3, seed=4)
  prompts = jnp.stack([r["prompt_tokens"] for r in rows])
  mask = jnp.stack([r["prompt_mask"] for r in rows])
  comps = jax.random.randint(jax.random.key(3), (6, 5), 4, CFG.vocab_size)
  weights = jax.random.normal(jax.random.key(4), (6, 5))
  shared = lambda p: jnp.sum(weights * rl.completion_logprobs(
      p, prompts, mask, comps, graphdef=graphdef, group_size=2, temperature=0.9))
  naive = lambda p: jnp.sum(weights * _naive_logprobs(p, graphdef, prompts, mask, comps, 2, 0.9))
  # Jitted, as the trainer runs them: op by op, the two gradients took about a minute.
  (got, got_grads), (want, want_grads) = (jax.jit(jax.value_and_grad(f))(params)
                                          for f in (shared, naive))
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


def _run(workdir, steps, stop_after=None):
  mesh = sharding.make_mesh(2, 2, 2)
  model = sharding.create_sharded(lambda: model_lib.Transformer(CFG, nnx.Rngs(0)), mesh)
  graphdef, params = nnx.split(model)
  opt = typed_configs.optimizer(steps, learning_rate=1e-2, warmup_steps=0, weight_decay=0.0)
  cfg = typed_configs.rl(steps, opt, dict(checkpoint_every=2, log_every=100), prompts_per_step=4,
                         group_size=2, max_new_tokens=4, beta=0.1)
  return rl.run_grpo(cfg, mesh, graphdef, params, params, _iterator(_prompts(), 4), _Tok(),
                     str(workdir), seed=0, stop_after=stop_after, ref_handle={"dir": "x"},
                     balance=BALANCE)


def test_resume_matches_uninterrupted(tmp_path):
  full = _run(tmp_path / "a", 4)
  _run(tmp_path / "b", 4, stop_after=3)  # killed during step 3; newest checkpoint: step 2
  resumed = _run(tmp_path / "b", 4)
  assert int(full.step) == int(resumed.step) == 4
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rows_a = metrics_log.read_metrics(tmp_path / "a" / "metrics.jsonl")
  rows_b = metrics_log.read_metrics(tmp_path / "b" / "metrics.jsonl")
  assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
  assert [r["reward_mean"] for r in rows_a] == [r["reward_mean"] for r in rows_b]
  for key in ("kl", "clip_frac", "entropy", "logprob_gap", "zero_spread_groups",
              "format_failure_rate", "accuracy"):
    assert key in rows_a[0]
  # The params moved and the sampler/trainer gap is numerical noise.
  assert max(r["logprob_gap"] for r in rows_a) < 1e-4


def _trainer(cfg, seed=0):
  """A 1-device GRPO trainer on the tiny model, its state and one prompt batch."""
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  model = sharding.create_sharded(lambda: model_lib.Transformer(CFG, nnx.Rngs(seed)), mesh)
  graphdef, params = nnx.split(model)
  tx, _ = optimizer_lib.make_optimizer(cfg.optimizer)
  state, state_sh = train_state.state_from_params(params, tx, mesh, seed)
  trainer = rl.GRPOTrainer(graphdef, tx, cfg, mesh, state_sh, params, BALANCE)
  return mesh, trainer, state, next(_iterator(_prompts(), cfg.prompts_per_step))


def _copy(state):
  return jax.tree.map(jnp.copy, state)


@pytest.fixture(scope="module")
def two_updates():
  """mu = 2 with the old log-probs recomputed: one trainer (one compile) for both tests."""
  opt = typed_configs.optimizer(6, learning_rate=3e-2, warmup_steps=0, weight_decay=0.0)
  cfg = typed_configs.rl(3, opt, prompts_per_step=4, group_size=4, max_new_tokens=4, beta=0.1,
                         updates_per_rollout=2, recompute_old_logprobs=True)
  return _trainer(cfg)


def test_two_updates_per_rollout_log_all_updates(two_updates):
  """mu = 2: the step equals rollout + two updates, its metrics the mean of both."""
  mesh, trainer, state, batch = two_updates
  with jax.set_mesh(mesh):
    rollout, _, _ = trainer.rollout(state.params, batch, jax.random.fold_in(state.rng, 1), _Tok())
    manual, auxes = _copy(state), []
    for _ in range(2):
      manual, aux = trainer.update(manual, rollout)
      auxes.append(jax.device_get(aux))
    stepped, metrics = trainer.step(_copy(state), 1, batch, _Tok())
  for a, b in zip(jax.tree.leaves(manual.params), jax.tree.leaves(stepped.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(stepped.step) == 1
  for key, logged in (("clip_frac", "clip_frac"), ("ratio_mean", "ratio_mean"), ("kl_mean", "kl"),
                      ("loss", "loss"), ("entropy", "entropy"), ("grad_norm", "grad_norm")):
    want = (float(auxes[0][key]) + float(auxes[1][key])) / 2
    assert metrics[logged] == pytest.approx(want, rel=1e-6, abs=1e-9), key
  # The first update runs at the sampling params (ratio 1); the second does not, so a
  # first-update-only log would miss it.
  assert abs(float(auxes[0]["ratio_mean"]) - 1) < 1e-5
  assert abs(float(auxes[1]["ratio_mean"]) - 1) > 1e-3
  assert metrics["logprob_gap"] == float(auxes[0]["logprob_gap"]) < 1e-5


def test_recompute_old_logprobs_in_the_update_batch(two_updates):
  """The old log-probs are the trainer's own at the sampling params, not the sampler's."""
  mesh, trainer, state, batch = two_updates
  cfg = trainer.cfg
  rng = jax.random.fold_in(state.rng, 1)
  with jax.set_mesh(mesh):
    got, _, _ = trainer.rollout(state.params, batch, rng, _Tok())
    prompts, pmask = got["prompt_tokens"], got["prompt_mask"]
    want = trainer.logprobs(state.params, prompts, pmask, got["completions"])
    sampled = sampler.sample(trainer.graphdef, state.params, prompts, pmask, rng,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             top_k=cfg.top_k, top_p=cfg.top_p, eos_id=_Tok.eos_id,
                             pad_id=_Tok.pad_id, cache_dtype=cfg.cache_dtype,
                             group_size=cfg.group_size)
  np.testing.assert_array_equal(np.asarray(got["completions"]), np.asarray(sampled.tokens))
  m = np.asarray(got["completion_mask"]) > 0
  np.testing.assert_array_equal(np.asarray(got["old_logprobs"])[m], np.asarray(want)[m])
  np.testing.assert_allclose(np.asarray(got["old_logprobs"])[m],
                             np.asarray(sampled.logprobs)[m], atol=1e-4)


def test_schedule_spans_every_update():
  """mu = 2 doubles the schedule (warm-up included): lr still decays over the last half."""
  cfg = typed_configs.rl(10, updates_per_rollout=2)
  plain = typed_configs.rl(10)
  assert cfg.optimizer.total_steps == 20 and plain.optimizer.total_steps == 10
  assert cfg.optimizer.warmup_steps == 2 * plain.optimizer.warmup_steps == 10
  _, schedule = optimizer_lib.make_optimizer(cfg.optimizer)
  lrs = np.array([float(schedule(k)) for k in range(20)])
  assert np.all(np.diff(lrs[10:]) < 0)  # no flat tail at the end value after `steps` updates
  assert lrs[-1] > cfg.optimizer.learning_rate * cfg.optimizer.end_lr_ratio
  with pytest.raises(ValueError, match="updates_per_rollout"):
    dataclasses.replace(cfg, optimizer=plain.optimizer)


def test_recompute_old_logprobs():
  """The old log-probs become the trainer's own at the sampling params, not the sampler's."""
  cfg = typed_configs.rl(2, prompts_per_step=4, group_size=2, max_new_tokens=5, beta=0.0,
                         recompute_old_logprobs=True)
  mesh, trainer, state, batch = _trainer(cfg, seed=3)
  rng = jax.random.fold_in(state.rng, 1)
  with jax.set_mesh(mesh):
    got, _, _ = trainer.rollout(state.params, batch, rng, _Tok())
    _, sampler_trainer, _, _ = _trainer(dataclasses.replace(cfg, recompute_old_logprobs=False))
    sampled, _, _ = sampler_trainer.rollout(state.params, batch, rng, _Tok())
    want = trainer.logprobs(state.params, got["prompt_tokens"], got["prompt_mask"],
                            got["completions"])
    np.testing.assert_array_equal(np.asarray(got["completions"]),
                                  np.asarray(sampled["completions"]))
    m = np.asarray(got["completion_mask"]) > 0
    np.testing.assert_array_equal(np.asarray(got["old_logprobs"])[m], np.asarray(want)[m])
    np.testing.assert_allclose(np.asarray(got["old_logprobs"])[m],
                               np.asarray(sampled["old_logprobs"])[m], atol=1e-4)
    _, metrics = trainer.step(state, 1, batch, _Tok())
  assert metrics["logprob_gap"] < 1e-5 and metrics["ratio_mean"] == pytest.approx(1, abs=1e-5)


def test_bad_config_fails_loudly():
  with pytest.raises(ValueError, match="aggregation"):
    typed_configs.rl(1, prompts_per_step=1, aggregation="mean")
  with pytest.raises(KeyError):
    typed_configs.rl(1, prompts_per_step=1, reward_weights=(("no_such_reward", 1.0),))
  with pytest.raises(ValueError, match="rl.temperature must be > 0"):
    typed_configs.rl(1, temperature=0.0)
  with pytest.raises(ValueError, match="rl.top_k=5"):
    typed_configs.rl(1, top_k=5)
  with pytest.raises(ValueError, match="rl.top_p=0.9"):
    typed_configs.rl(1, top_p=0.9)
  with pytest.raises(ValueError, match="rl.advantage_scale"):
    typed_configs.rl(1, advantage_scale="group_std")
  with pytest.raises(ValueError, match="grad_accum_steps"):
    typed_configs.rl(1, typed_configs.optimizer(1, grad_accum_steps=2))
