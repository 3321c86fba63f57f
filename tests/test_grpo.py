"""GRPO maths against plain NumPy on fixed numbers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepimagine_jax import grpo

EPS_LOW, EPS_HIGH = 0.2, 0.28


# ----------------------------------------------------------------------------- NumPy references

def np_advantages(r, g, scale, eps=1e-6):
  r = np.asarray(r, np.float64).reshape(-1, g)
  adv = r - r.mean(1, keepdims=True)
  zero = np.ptp(r, axis=1) == 0
  adv[zero] = 0.0
  if scale == "batch_std":
    adv = adv / (adv.std() + eps)  # ddof=0, over every sample of the batch
  return adv.reshape(-1), int(zero.sum())


def np_policy_loss(new, old, adv, mask, eps_low, eps_high, beta, ref, aggregation):
  """Loops over tokens, one branch at a time, to be independent of the jnp code."""
  B, T = new.shape
  tok = np.zeros((B, T))
  grad = np.zeros((B, T))  # d per-token loss / d new
  kl = np.zeros((B, T))
  low = np.zeros((B, T), bool)
  high = np.zeros((B, T), bool)
  ratio = np.zeros((B, T))
  for b in range(B):
    for t in range(T):
      if not mask[b, t]:
        continue
      r = np.exp(new[b, t] - old[b, t])
      a = adv[b]
      ratio[b, t] = r
      if a > 0 and r > 1 + eps_high:
        tok[b, t], high[b, t] = -(1 + eps_high) * a, True
      elif a < 0 and r < 1 - eps_low:
        tok[b, t], low[b, t] = -(1 - eps_low) * a, True
      else:
        tok[b, t], grad[b, t] = -r * a, -r * a
      if ref is not None and beta != 0:
        d = ref[b, t] - new[b, t]
        kl[b, t] = np.exp(d) - d - 1
        tok[b, t] += beta * kl[b, t]
        grad[b, t] += beta * (1 - np.exp(d))
  m = mask.astype(bool)
  n = m.sum()
  if aggregation == "token":
    loss, w = tok[m].sum() / n, np.full((B, T), 1.0 / n)
  else:
    rows = [b for b in range(B) if m[b].any()]
    loss = np.mean([tok[b][m[b]].mean() for b in rows])
    w = np.zeros((B, T))
    for b in rows:
      w[b] = 1.0 / (m[b].sum() * len(rows))
  aux = {
      "clip_frac": (low | high)[m].mean(), "clip_frac_low": low[m].mean(),
      "clip_frac_high": high[m].mean(), "ratio_mean": ratio[m].mean(),
      "kl_mean": kl[m].mean(), "token_loss_mean": tok[m].mean(),
  }
  return loss, aux, grad * w * m


def fixed_batch(seed=0, B=4, T=6):
  """Tokens that land in every branch: clipped high (A>0), clipped low (A<0), unclipped."""
  rng = np.random.default_rng(seed)
  old = rng.uniform(-3, -0.5, (B, T))
  # Log-ratios spread well past both clip edges, kept off the edges themselves.
  vals = np.array([-0.9, 0.4, -0.1, 0.05, -0.5, 0.8, 0.15])
  delta = vals[(2 * np.arange(B)[:, None] + np.arange(T)[None, :] + seed) % len(vals)]
  new = old + delta
  ref = old + rng.uniform(-0.5, 0.5, (B, T))
  adv = np.array([1.3, -0.7, 0.4, -2.0])[:B]
  mask = np.ones((B, T))
  mask[0, 4:] = 0
  mask[2, :2] = 0
  mask[3, 5] = 0
  return new, old, ref, adv, mask


# ----------------------------------------------------------------------------- advantages

REWARDS = np.array([1.0, 0.0, 1.0, 1.0,   # spread
                    0.5, 0.5, 0.5, 0.5,   # zero spread
                    0.1, 0.1, 0.1, 0.1,   # zero spread, where float mean is inexact
                    -2.0, 3.0, 0.25, 0.0])


@pytest.mark.parametrize("scale", ["none", "batch_std"])
def test_group_advantages_vs_numpy(scale):
  adv, n_zero = grpo.group_advantages(jnp.asarray(REWARDS), 4, scale=scale)
  want, want_zero = np_advantages(REWARDS, 4, scale)
  np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-5, atol=1e-6)
  assert int(n_zero) == want_zero == 2
  assert np.all(np.asarray(adv)[4:12] == 0.0)  # exactly zero


def test_group_advantages_hand_case_and_jit():
  # groups [1, 0] and [2, 2]: centred +-0.5 and 0, 0; batch std = sqrt(2 * 0.25 / 4) = 0.3536
  f = jax.jit(grpo.group_advantages, static_argnames=("group_size", "scale"))
  adv, n_zero = f(jnp.array([1.0, 0.0, 2.0, 2.0]), group_size=2, scale="batch_std")
  s = np.sqrt(0.125)
  np.testing.assert_allclose(np.asarray(adv), [0.5 / (s + 1e-6), -0.5 / (s + 1e-6), 0, 0],
                             rtol=1e-6)
  assert int(n_zero) == 1
  adv, _ = f(jnp.array([1.0, 0.0, 2.0, 2.0]), group_size=2, scale="none")
  np.testing.assert_array_equal(np.asarray(adv), [0.5, -0.5, 0, 0])
  with pytest.raises(ValueError, match="group_size"):
    grpo.group_advantages(jnp.zeros(5), 2, scale="none")
  with pytest.raises(ValueError, match="advantage scale"):
    grpo.group_advantages(jnp.zeros(4), 2, scale="group_std")


@pytest.mark.parametrize("scale", ["none", "batch_std"])
def test_mixed_rewards_keep_their_relative_weights(scale):
  """correctness + 0.1 format: a group that differs only in format moves 10x less.

  Per-group std scaling (the GRPO paper's) would give both groups advantages of +-1.
  """
  correct = np.array([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
  fmt = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
  adv_c, _ = grpo.group_advantages(jnp.asarray(correct), 4, scale="none")
  adv_f, _ = grpo.group_advantages(jnp.asarray(fmt), 4, scale="none")
  adv, _ = grpo.group_advantages(jnp.asarray(correct + 0.1 * fmt), 4, scale=scale)
  mixed = np.asarray(adv_c) + 0.1 * np.asarray(adv_f)  # linear in the rewards, up to one scalar
  k = np.max(np.abs(np.asarray(adv))) / np.max(np.abs(mixed))
  np.testing.assert_allclose(np.asarray(adv), k * mixed, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.abs(np.asarray(adv)[4:]).max() / np.abs(np.asarray(adv)[:4]).max(),
                             0.1, rtol=1e-5)


# ----------------------------------------------------------------------------- policy loss

def call_loss(new, old, adv, mask, ref, beta, aggregation):
  return grpo.policy_loss(jnp.asarray(new, jnp.float32), jnp.asarray(old, jnp.float32),
                          jnp.asarray(adv, jnp.float32), jnp.asarray(mask, jnp.float32),
                          eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=beta,
                          logp_ref_BT=None if ref is None else jnp.asarray(ref, jnp.float32),
                          aggregation=aggregation)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
@pytest.mark.parametrize("beta,use_ref", [(0.0, False), (0.04, True), (0.0, True)])
def test_policy_loss_vs_numpy(aggregation, beta, use_ref):
  new, old, ref, adv, mask = fixed_batch()
  ref = ref if use_ref else None
  loss, aux = call_loss(new, old, adv, mask, ref, beta, aggregation)
  want, want_aux, _ = np_policy_loss(new, old, adv, mask, EPS_LOW, EPS_HIGH, beta, ref,
                                     aggregation)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
  for k, v in want_aux.items():
    np.testing.assert_allclose(float(aux[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)
  assert float(aux["n_tokens"]) == mask.sum()
  if beta == 0:
    assert float(aux["kl_mean"]) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_all_clip_branches_are_exercised(seed):
  """The fixed batch must hit each branch, or the comparison above proves little."""
  new, old, _, adv, mask = fixed_batch(seed)
  _, aux = call_loss(new, old, adv, mask, None, 0.0, "token")
  r = np.exp(new - old)
  m = mask.astype(bool)
  A = np.broadcast_to(adv[:, None], r.shape)
  assert (m & (A > 0) & (r > 1 + EPS_HIGH)).any()      # clipped high
  assert (m & (A < 0) & (r < 1 - EPS_LOW)).any()       # clipped low
  assert (m & (A > 0) & (r < 1 - EPS_LOW)).any()       # A>0, low ratio: not clipped
  assert (m & (A < 0) & (r > 1 + EPS_HIGH)).any()      # A<0, high ratio: not clipped
  assert 0 < float(aux["clip_frac_low"]) and 0 < float(aux["clip_frac_high"])
  assert float(aux["clip_frac"]) == pytest.approx(
      float(aux["clip_frac_low"]) + float(aux["clip_frac_high"]))


def test_clip_hand_cases():
  """One token per case, hand-computed: r=1.5 and r=0.5 with A=+-1."""
  lr = np.log([1.5, 1.5, 0.5, 0.5, 1.1])
  new = lr[None, :]
  old = np.zeros_like(new)
  mask = np.ones_like(new)
  want = [-(1 + EPS_HIGH), 1.5, -0.5, (1 - EPS_LOW), -1.1]  # A = +1, -1, +1, -1, +1
  for i, a in enumerate([1.0, -1.0, 1.0, -1.0, 1.0]):
    loss, _ = call_loss(new[:, i:i + 1], old[:, i:i + 1], [a], mask[:, i:i + 1], None, 0.0,
                        "token")
    np.testing.assert_allclose(float(loss), want[i], rtol=1e-6)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_grad_vs_analytic(aggregation):
  new, old, ref, adv, mask = fixed_batch(seed=1)
  beta = 0.1

  def f(new_BT):
    return grpo.policy_loss(new_BT, jnp.asarray(old, jnp.float32), jnp.asarray(adv),
                            jnp.asarray(mask), eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=beta,
                            logp_ref_BT=jnp.asarray(ref, jnp.float32),
                            aggregation=aggregation)[0]

  g = jax.jit(jax.grad(f))(jnp.asarray(new, jnp.float32))
  _, _, want = np_policy_loss(new, old, adv, mask, EPS_LOW, EPS_HIGH, beta, ref, aggregation)
  np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-6)


def test_grad_vs_finite_differences():
  new, old, ref, adv, mask = fixed_batch(seed=2)
  args = dict(eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=0.05, aggregation="sequence")

  def f(new_BT):
    return float(np_policy_loss(new_BT, old, adv, mask, ref=ref, **args)[0])

  g = np.asarray(jax.grad(lambda x: grpo.policy_loss(
      x, jnp.asarray(old, jnp.float32), jnp.asarray(adv), jnp.asarray(mask),
      logp_ref_BT=jnp.asarray(ref, jnp.float32), **args)[0])(jnp.asarray(new, jnp.float32)))
  h = 1e-6
  for b, t in [(0, 0), (1, 2), (2, 3), (3, 1), (0, 5), (2, 0)]:
    e = np.zeros_like(new)
    e[b, t] = h
    fd = (f(new + e) - f(new - e)) / (2 * h)
    np.testing.assert_allclose(g[b, t], fd, rtol=1e-3, atol=1e-6, err_msg=str((b, t)))


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
@pytest.mark.parametrize("garbage", [1e4, -1e30, np.inf, np.nan])
def test_masked_tokens_have_no_effect(aggregation, garbage):
  new, old, ref, adv, mask = fixed_batch(seed=3)
  off = mask == 0

  def run(new, old, ref):
    def f(x):
      return grpo.policy_loss(x, jnp.asarray(old, jnp.float32), jnp.asarray(adv),
                              jnp.asarray(mask), eps_low=EPS_LOW, eps_high=EPS_HIGH,
                              beta=0.04, logp_ref_BT=jnp.asarray(ref, jnp.float32),
                              aggregation=aggregation)
    (loss, aux), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(new, jnp.float32))
    return float(loss), {k: float(v) for k, v in aux.items()}, np.asarray(g)

  loss0, aux0, g0 = run(new, old, ref)
  bad_new, bad_old, bad_ref = new.copy(), old.copy(), ref.copy()
  bad_new[off], bad_old[off], bad_ref[off] = garbage, -garbage, garbage
  loss1, aux1, g1 = run(bad_new, bad_old, bad_ref)
  assert np.isfinite(loss1)
  assert loss0 == loss1
  assert aux0 == aux1
  np.testing.assert_array_equal(g0, g1)
  assert np.all(g1[off] == 0.0)


def test_kl_k3_vs_numpy_and_nonnegative():
  rng = np.random.default_rng(4)
  new = rng.uniform(-6, 0, (3, 50))
  ref = rng.uniform(-6, 0, (3, 50))
  mask = np.ones_like(new)
  _, aux = grpo.policy_loss(jnp.asarray(new), jnp.asarray(new), jnp.zeros(3), jnp.asarray(mask),
                            eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=1.0,
                            logp_ref_BT=jnp.asarray(ref))
  d = ref - new
  k3 = np.exp(d) - d - 1
  assert np.all(k3 >= 0)
  np.testing.assert_allclose(float(aux["kl_mean"]), k3.mean(), rtol=1e-5)
  # with A = 0 and ratio 1, the whole loss is beta * KL, and it is >= 0
  assert float(aux["token_loss_mean"]) >= 0
  _, aux_same = grpo.policy_loss(jnp.asarray(new), jnp.asarray(new), jnp.zeros(3),
                                 jnp.asarray(mask), eps_low=EPS_LOW, eps_high=EPS_HIGH,
                                 beta=1.0, logp_ref_BT=jnp.asarray(new))
  assert float(aux_same["kl_mean"]) == 0.0


def test_sequence_aggregation_ignores_empty_rows_and_jits():
  new, old, _, adv, mask = fixed_batch(seed=5)
  mask[1] = 0  # an all-padding row
  f = jax.jit(grpo.policy_loss,
              static_argnames=("eps_low", "eps_high", "beta", "aggregation"))
  for agg in ["token", "sequence"]:
    loss, _ = f(jnp.asarray(new, jnp.float32), jnp.asarray(old, jnp.float32),
                jnp.asarray(adv, jnp.float32), jnp.asarray(mask), eps_low=EPS_LOW,
                eps_high=EPS_HIGH, beta=0.0, aggregation=agg)
    want, _, _ = np_policy_loss(new, old, adv, mask, EPS_LOW, EPS_HIGH, 0.0, None, agg)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  with pytest.raises(ValueError, match="aggregation"):
    grpo.policy_loss(new, old, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.0,
                     aggregation="mean")


def test_traced_beta_zero_reports_no_kl():
  new, old, ref, adv, mask = fixed_batch()
  f = jax.jit(lambda beta: grpo.policy_loss(
      jnp.asarray(new, jnp.float32), jnp.asarray(old, jnp.float32), jnp.asarray(adv),
      jnp.asarray(mask), eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=beta,
      logp_ref_BT=jnp.asarray(ref, jnp.float32)))
  loss0, aux0 = f(jnp.float32(0.0))
  want, _, _ = np_policy_loss(new, old, adv, mask, EPS_LOW, EPS_HIGH, 0.0, None, "token")
  np.testing.assert_allclose(float(loss0), want, rtol=1e-5)
  assert float(aux0["kl_mean"]) == 0.0
  _, aux1 = f(jnp.float32(0.5))
  assert float(aux1["kl_mean"]) > 0.0


# ----------------------------------------------------------------------------- logits helpers

def test_logprobs_and_entropy_vs_numpy():
  rng = np.random.default_rng(6)
  logits = rng.normal(0, 3, (2, 5, 11)).astype(np.float32)
  tokens = rng.integers(0, 11, (2, 5))
  mask = np.array([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], np.float32)
  x = logits.astype(np.float64)
  logp = x - x.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  want_lp = np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
  got_lp = grpo.logprobs_from_logits(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32),
                                     jnp.asarray(tokens))
  assert got_lp.dtype == jnp.float32
  got_lp = grpo.logprobs_from_logits(jnp.asarray(logits), jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(got_lp), want_lp, rtol=1e-5, atol=1e-5)
  ent = -(np.exp(logp) * logp).sum(-1)
  got_ent = grpo.token_entropy(jnp.asarray(logits), jnp.asarray(mask))
  np.testing.assert_allclose(float(got_ent), ent[mask > 0].mean(), rtol=1e-5)


def test_entropy_edge_cases():
  # uniform over V -> log V; a -inf logit contributes 0, not NaN
  V = 8
  u = jnp.zeros((1, 1, V))
  np.testing.assert_allclose(float(grpo.token_entropy(u, jnp.ones((1, 1)))), np.log(V),
                             rtol=1e-6)
  x = jnp.array([[[0.0, 0.0, -jnp.inf, -jnp.inf]]])
  np.testing.assert_allclose(float(grpo.token_entropy(x, jnp.ones((1, 1)))), np.log(2),
                             rtol=1e-6)
  assert float(grpo.token_entropy(u, jnp.zeros((1, 1)))) == 0.0
  lp = grpo.logprobs_from_logits(jnp.asarray(np.full((1, 1, 4), 5.0), jnp.bfloat16),
                                 jnp.array([[2]]))
  assert lp.dtype == jnp.float32
  np.testing.assert_allclose(float(lp[0, 0]), -np.log(4), rtol=1e-6)
