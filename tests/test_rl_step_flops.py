"""bench/rl_step.py's analytic FLOP count against XLA's own cost analysis."""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import rl_step  # noqa: E402
from deepimagine_jax import model as model_lib  # noqa: E402
from deepimagine_jax import rl  # noqa: E402
from deepimagine_jax.config import ModelConfig  # noqa: E402

# Wide enough that the matmuls dominate XLA's count as they do at the bench's shape.
CFG = ModelConfig.tiny().replace(vocab_size=2048, d_model=128, mlp_dim=384, head_dim=32)


def xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).cost_analysis()  # unoptimised HLO: no compile needed
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_forward_flops_match_cost_analysis():
  graphdef, params = nnx.split(model_lib.Transformer(CFG, nnx.Rngs(0)))
  B, T = 2, 48

  def forward(params, tokens_BT):
    positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    return nnx.merge(graphdef, params)(tokens_BT, positions_BT)[0]

  got = xla_flops(forward, params, jnp.zeros((B, T), jnp.int32))
  # The model scores all T x T pairs (masked), so count them all here.
  want = rl_step.forward_flops(CFG, B * T, B * T * T, B * T)
  np.testing.assert_allclose(got, want, rtol=0.03)


def test_reference_and_update_flops_match_cost_analysis():
  """The shared-prefix log-prob pass, forward and forward + backward, at a GRPO shape."""
  Q, G, P, C = 2, 3, 24, 8
  B, L = Q * G, P + C - 1
  graphdef, params = nnx.split(model_lib.Transformer(CFG, nnx.Rngs(0)))
  logprobs = functools.partial(rl.completion_logprobs, graphdef=graphdef, group_size=G,
                               temperature=1.0)
  args = (jnp.ones((Q, P), jnp.int32), jnp.ones((Q, P), jnp.int32), jnp.ones((B, C), jnp.int32))
  grad = jax.grad(lambda p, *a: jnp.sum(logprobs(p, *a)))
  fwd, fwd_bwd = xla_flops(logprobs, params, *args), xla_flops(grad, params, *args)
  # Dense (what the implementation scores): every query against all L cache slots.
  dense = (rl_step.forward_flops(CFG, Q * P, Q * P * L, 0)
           + rl_step.forward_flops(CFG, B * (C - 1), B * (C - 1) * L, B * C))
  np.testing.assert_allclose(fwd, dense, rtol=0.03)
  np.testing.assert_allclose(fwd_bwd, 3 * dense, rtol=0.06)
  # The bench counts causal pairs only: the masked-out pairs are exactly the difference.
  counted = rl_step.step_flops(CFG, Q, G, P, C, beta=0.04)
  masked_pairs = Q * (P * L - P * (P + 1) // 2) + B * sum(L - (P + j + 1) for j in range(C - 1))
  assert dense - counted["reference"] == CFG.n_layers * 4 * CFG.n_heads * CFG.head_dim * masked_pairs
  assert counted["update"] == 3 * counted["reference"]


def test_sampling_flops_count_prefill_once_per_prompt():
  """Prefill scales with prompts, not samples; decode with rows x (new - 1)."""
  one = rl_step.step_flops(CFG, 2, 1, 16, 5, beta=0.0)["sample"]
  four = rl_step.step_flops(CFG, 2, 4, 16, 5, beta=0.0)["sample"]
  decode_row = rl_step.step_flops(CFG, 1, 2, 16, 5, beta=0.0)["sample"] - rl_step.step_flops(
      CFG, 1, 1, 16, 5, beta=0.0)["sample"]
  assert four - one == 2 * 3 * decode_row
  assert rl_step.step_flops(CFG, 2, 4, 16, 5, beta=0.0)["reference"] == 0


def test_host_devices_flag_replaces_the_device_count_and_keeps_other_flags(monkeypatch):
  from bench import peer_tunix
  monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1 --xla_force_host_platform_device_count=8")
  assert peer_tunix.use_host_devices(["--steps=3", "--host_devices=3", "--peer=tunix"]) == 3
  assert os.environ["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=3"
  monkeypatch.setenv("XLA_FLAGS", "")
  assert peer_tunix.use_host_devices([]) == (os.cpu_count() or 1)  # one device per core
  with pytest.raises(SystemExit, match="--host_devices must be >= 1"):
    peer_tunix.use_host_devices(["--host_devices=0"])


def test_peak_matmul_seconds_are_positive_on_the_sharded_devices():
  seconds = rl_step.make_peak(64, jnp.float32)  # 8 fake devices: the row-split variant too
  assert 0 < seconds() < 10


@pytest.mark.parametrize("tie", [True, False])
def test_decode_bound_weight_bytes_are_the_models_matrices(tie):
  """bench/decode_bound.py streams the model's weight bytes: every parameter with two or
  more axes of an initialised model (the norms' vectors left out), tied head or not."""
  from bench import decode_bound
  cfg = CFG.replace(tie_embeddings=tie)
  params = nnx.state(model_lib.Transformer(cfg, nnx.Rngs(0)), nnx.Param)
  want = sum(x.nbytes for x in jax.tree.leaves(params) if x.ndim >= 2)
  assert decode_bound.weight_bytes(cfg) == want
