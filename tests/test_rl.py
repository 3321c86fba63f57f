"""GRPO loop: trainer/sampler log-prob agreement and exact resume."""
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepimagine_jax import grpo
from deepimagine_jax import metrics_log
from deepimagine_jax import model as model_lib
from deepimagine_jax import rl
from deepimagine_jax import sampler
from deepimagine_jax import sharding
from deepimagine_jax.config import ModelConfig
import typed_configs
from deepimagine_jax import prefix

CFG = ModelConfig.tiny().replace(vocab_size=48, n_layers=1, tie_embeddings=False)
P = 8


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
  logits = prefix.continuation_logits(model, prompts, mask, out.tokens, group_size=3,
                                      temperature=temperature)
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
  np.testing.assert_allclose(float(shared(params)), float(naive(params)), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.grad(shared)(params)),
                  jax.tree.leaves(jax.grad(naive)(params))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


def _run(workdir, steps, stop_after=None):
  mesh = sharding.make_mesh(2, 2, 2)
  model = sharding.create_sharded(lambda: model_lib.Transformer(CFG, nnx.Rngs(0)), mesh)
  graphdef, params = nnx.split(model)
  opt = typed_configs.optimizer(steps, learning_rate=1e-2, warmup_steps=0, weight_decay=0.0)
  cfg = typed_configs.rl(steps, opt, dict(checkpoint_every=2, log_every=100), prompts_per_step=4,
                         group_size=2, max_new_tokens=4, beta=0.1)
  return rl.run_grpo(cfg, mesh, graphdef, params, params, _iterator(_prompts(), 4), _Tok(),
                     str(workdir), seed=0, stop_after=stop_after, ref_handle={"dir": "x"})


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


def test_bad_config_fails_loudly():
  with pytest.raises(ValueError, match="aggregation"):
    typed_configs.rl(1, prompts_per_step=1, aggregation="mean")
  with pytest.raises(KeyError):
    typed_configs.rl(1, prompts_per_step=1, reward_weights=(("no_such_reward", 1.0),))
