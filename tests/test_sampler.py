"""The sampler: KV-cache decoding equals recomputation, EOS handling, log-probs, sharding.

The tiny model here has an untied output head: with tied std-1 embeddings a fresh
model copies its input token forever, which would make "same tokens" trivially true.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepimagine_jax import model as M
from deepimagine_jax import sampler as S
from deepimagine_jax import sharding
from deepimagine_jax.config import ModelConfig

CFG = ModelConfig.tiny().replace(tie_embeddings=False)
N_NEW = 20
PROMPT_LENS = (10, 7, 3, 1)  # left-padded into P = 10
PAD = 0


def _prompt():
  B, P = len(PROMPT_LENS), max(PROMPT_LENS)
  tok = np.asarray(jax.random.randint(jax.random.key(7), (B, P), 1, CFG.vocab_size))
  mask = np.zeros((B, P), np.int32)
  for b, n in enumerate(PROMPT_LENS):
    mask[b, P - n:] = 1
  return jnp.asarray(np.where(mask > 0, tok, PAD), jnp.int32), jnp.asarray(mask)


@pytest.fixture(scope="module")
def tiny():
  model = M.Transformer(CFG, nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  return model, graphdef, state


@pytest.fixture(scope="module")
def greedy(tiny):
  _, graphdef, state = tiny
  tok, mask = _prompt()
  return S.sample(graphdef, state, tok, mask, jax.random.key(0), max_new_tokens=N_NEW,
                  temperature=0.0, pad_id=PAD)


@pytest.fixture(scope="module")
def warm(tiny):
  """Temperature sampling with top-k on; reused by several tests (one compile)."""
  _, graphdef, state = tiny
  tok, mask = _prompt()
  run = lambda key: S.sample(graphdef, state, tok, mask, key, max_new_tokens=N_NEW,
                             temperature=0.7, top_k=50, pad_id=PAD)
  return run


@jax.jit
def _forward(graphdef, state, seq_BT, pos_BT, seg_BT):
  return nnx.merge(graphdef, state)(seq_BT, pos_BT, segment_ids_BT=seg_BT)[0]


def _full_logits(tiny, seq_BT, mask_BT):
  """A full forward without a cache: padding is segment 0, positions skip it."""
  _, graphdef, state = tiny
  mask = np.asarray(mask_BT).astype(np.int32)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  return np.asarray(_forward(graphdef, state, jnp.asarray(seq_BT), pos, mask), np.float64)


def _greedy_by_recompute(tiny, tok_BP, mask_BP, n):
  """The reference: re-run the model over the whole sequence for every new token.

  The sequence lives in a fixed [B, P + n] buffer (one compile); slots not yet
  written are padding (segment 0) and, being in the future, invisible anyway.
  """
  B, P = tok_BP.shape
  seq = np.concatenate([np.asarray(tok_BP), np.full((B, n), PAD)], 1)
  mask = np.concatenate([np.asarray(mask_BP), np.zeros((B, n), np.int32)], 1)
  for t in range(n):
    nxt = _full_logits(tiny, seq, mask)[:, P + t - 1].argmax(-1)
    seq[:, P + t], mask[:, P + t] = nxt, 1
  return seq[:, P:]


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_cache_decoding_equals_recomputation(tiny, greedy):
  tok, mask = _prompt()
  want = _greedy_by_recompute(tiny, tok, mask, N_NEW)
  assert len(set(want[0].tolist())) > 3  # a sequence that actually moves
  np.testing.assert_array_equal(np.asarray(greedy.tokens), want)
  np.testing.assert_array_equal(np.asarray(greedy.lengths), [N_NEW] * len(PROMPT_LENS))
  np.testing.assert_array_equal(np.asarray(greedy.completion_mask), 1.0)
  np.testing.assert_array_equal(np.asarray(greedy.sequences)[:, :tok.shape[1]], tok)
  np.testing.assert_array_equal(np.asarray(greedy.sequence_mask)[:, :tok.shape[1]], mask)


def test_greedy_logprobs_match_full_forward(tiny, greedy):
  tok, _ = _prompt()
  P = tok.shape[1]
  logits = _full_logits(tiny, greedy.sequences, greedy.sequence_mask)
  logp = _log_softmax(logits[:, P - 1:-1])
  want = np.take_along_axis(logp, np.asarray(greedy.tokens)[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(greedy.logprobs), want, atol=1e-4)


def test_eos_stops_row_and_pads(tiny, greedy):
  _, graphdef, state = tiny
  tok, mask = _prompt()
  free = np.asarray(greedy.tokens)
  eos = int(free[1, 0])  # row 1 stops at once; other rows wherever eos first appears
  out = S.sample(graphdef, state, tok, mask, jax.random.key(0), max_new_tokens=N_NEW,
                 temperature=0.0, eos_id=eos, pad_id=PAD)
  got, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  cmask, logp = np.asarray(out.completion_mask), np.asarray(out.logprobs)
  assert lengths[1] == 1
  for b in range(len(PROMPT_LENS)):
    hits = np.flatnonzero(free[b] == eos)
    n = hits[0] + 1 if hits.size else N_NEW
    assert lengths[b] == n
    np.testing.assert_array_equal(got[b, :n], free[b, :n])  # EOS itself included
    np.testing.assert_array_equal(got[b, n:], PAD)
    np.testing.assert_array_equal(cmask[b], [1.0] * n + [0.0] * (N_NEW - n))
    np.testing.assert_allclose(logp[b, :n], np.asarray(greedy.logprobs)[b, :n], atol=1e-6)
    np.testing.assert_array_equal(logp[b, n:], 0.0)
  seq_mask = np.asarray(out.sequence_mask)
  np.testing.assert_array_equal(seq_mask[:, tok.shape[1]:], cmask)


def test_sampled_logprobs_are_of_the_truncated_distribution(tiny, warm):
  """log p of each token under the distribution that drew it: top-50 of logits / T."""
  out = warm(jax.random.key(1))
  tok, _ = _prompt()
  P, T = tok.shape[1], 0.7
  logits = _full_logits(tiny, out.sequences, out.sequence_mask)[:, P - 1:-1]
  toks = np.asarray(out.tokens)
  kept = _np_truncate((logits / T).reshape(-1, logits.shape[-1]), 50, 1.0).reshape(logits.shape)
  want = np.take_along_axis(_log_softmax(kept), toks[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(out.logprobs), want, atol=1e-4)
  untruncated = np.take_along_axis(_log_softmax(logits / T), toks[..., None], -1)[..., 0]
  assert np.all(want > untruncated)  # renormalised over 50 of 512 tokens: every one higher
  # every sampled token lies inside the top 50 of the reference logits
  rank = (logits > np.take_along_axis(logits, toks[..., None], -1)).sum(-1)
  assert rank.max() < 50


def test_rng_determinism(warm):
  a, b, c = warm(jax.random.key(1)), warm(jax.random.key(1)), warm(jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


@pytest.mark.parametrize("setting", [dict(top_k=1), dict(top_p=1e-6)])
def test_top_k_one_and_tiny_top_p_are_greedy(tiny, greedy, setting):
  _, graphdef, state = tiny
  tok, mask = _prompt()
  out = S.sample(graphdef, state, tok, mask, jax.random.key(3), max_new_tokens=N_NEW,
                 temperature=1.0, pad_id=PAD, **setting)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy.tokens))


def _np_truncate(logits, top_k, top_p):
  """Reference: sort one row, keep the top-k, then the smallest nucleus >= top_p."""
  out = logits.copy()
  for row in out:
    order = np.argsort(-row, kind="stable")
    if top_k:
      row[order[top_k:]] = -np.inf
    p = np.exp(row - row.max())
    p /= p.sum()
    mass = 0.0
    for j, i in enumerate(order):
      if j > 0 and mass >= top_p:
        row[i] = -np.inf
      mass += p[i]
  return out


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.5), (4, 0.7), (0, 1e-9)])
def test_truncate_logits_matches_numpy(top_k, top_p):
  logits = np.asarray(jax.random.normal(jax.random.key(5), (3, 11)), np.float64) * 2
  got = np.asarray(S.truncate_logits(jnp.asarray(logits, jnp.float32), top_k, top_p))
  want = _np_truncate(logits, top_k, top_p)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)


def test_sharded_mesh_gives_same_greedy_tokens(greedy):
  mesh = sharding.make_mesh(2, 2, 2)
  model = sharding.create_sharded(lambda: M.Transformer(CFG, nnx.Rngs(0)), mesh)
  graphdef, state = nnx.split(model)
  tok, mask = _prompt()
  with jax.set_mesh(mesh):
    tok = jax.device_put(tok, sharding.batch_sharding(mesh))
    mask = jax.device_put(mask, sharding.batch_sharding(mesh))
    eos, pad = jnp.int32(-1), jnp.int32(PAD)
    greedy_kw = dict(temperature=0.0, top_k=0, top_p=1.0)
    st = S._prefill(graphdef, state, tok, mask, jax.random.key(0), eos, pad, None,
                    max_new_tokens=N_NEW, cache_dtype="float32", group_size=1, **greedy_kw)
    k = st.cache.rows[0]["k"]
    want = jax.sharding.NamedSharding(mesh, S.cache_spec(CFG.n_kv_heads, 4, mesh))
    assert k.sharding.is_equivalent_to(want, k.ndim)
    assert k.addressable_shards[0].data.shape == (1, N_NEW, 1, CFG.head_dim)
    st = S._decode(graphdef, state, st, eos, pad, **greedy_kw)
    out = S._finish(st.tokens_BL, st.mask_BC, st.logprobs_BC, st.lengths_B, mask)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy.tokens))
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(greedy.logprobs), atol=1e-4)


def test_cache_spec_drops_axes_that_do_not_divide():
  mesh = sharding.make_mesh(2, 2, 2)
  assert S.cache_spec(2, 4, mesh) == jax.sharding.PartitionSpec(("data", "fsdp"), None,
                                                                "tensor", None)
  assert S.cache_spec(3, 6, mesh) == jax.sharding.PartitionSpec(None, None, None, None)


def test_bf16_cache_runs(tiny, greedy):
  _, graphdef, state = tiny
  tok, mask = _prompt()
  out = S.sample(graphdef, state, tok, mask, jax.random.key(0), max_new_tokens=N_NEW,
                 temperature=0.0, pad_id=PAD, cache_dtype=jnp.bfloat16)
  assert out.tokens.shape == (len(PROMPT_LENS), N_NEW) and out.tokens.dtype == jnp.int32
  assert bool(jnp.all(jnp.isfinite(out.logprobs))) and bool(jnp.all(out.logprobs <= 0))
  # The first token comes from prefill logits that barely feel the rounding: its
  # log-prob is within rounding of the float32 greedy one (row 2 has a 0.004 logit
  # near-tie that bf16 may flip, so the tokens themselves are not compared).
  np.testing.assert_allclose(np.asarray(out.logprobs)[:, 0], np.asarray(greedy.logprobs)[:, 0],
                             atol=0.02)


def test_bad_settings_raise(tiny):
  _, graphdef, state = tiny
  tok, mask = _prompt()
  kw = dict(max_new_tokens=4, temperature=1.0)
  with pytest.raises(ValueError, match="top_p"):
    S.sample(graphdef, state, tok, mask, jax.random.key(0), top_p=0.0, **kw)
  with pytest.raises(ValueError, match="same"):
    S.sample(graphdef, state, tok, mask[:, 1:], jax.random.key(0), **kw)
  with pytest.raises(ValueError, match="max_seq_len"):
    S.sample(graphdef, state, tok, mask, jax.random.key(0), max_new_tokens=CFG.max_seq_len)


def test_all_padding_filler_row_is_harmless(tiny, greedy):
  """A batch filler row with no real token stays finite and leaves other rows alone."""
  _, graphdef, state = tiny
  tok, mask = _prompt()
  tok, mask = tok.at[3].set(PAD), mask.at[3].set(0)
  out = S.sample(graphdef, state, tok, mask, jax.random.key(0), max_new_tokens=N_NEW,
                 temperature=0.0, pad_id=PAD)
  np.testing.assert_array_equal(np.asarray(out.tokens)[:3], np.asarray(greedy.tokens)[:3])
  assert bool(jnp.all(jnp.isfinite(out.logprobs)))



def _np_probs(logits, temperature, top_k, top_p):
  """softmax of the truncated logits / T, by the NumPy reference truncation above."""
  kept = _np_truncate((logits / temperature)[None], top_k, top_p)[0]
  p = np.exp(kept - kept.max())
  return p / p.sum()


# (V, temperature, top_k, top_p); V = 37 and 1000 are not squares, so the sampler's
# two-level CDF walk has a padded last block.
FREQ_CASES = [(37, 1.0, 0, 1.0), (37, 0.7, 5, 1.0), (37, 1.3, 0, 0.8), (37, 0.9, 8, 0.9),
              (1000, 1.0, 0, 1.0), (1000, 0.5, 3, 1.0)]


def _draw_counts(logits, temperature, top_k, top_p, n, seed):
  logits_NV = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, logits.shape[0]))
  u_N = jax.random.uniform(jax.random.key(seed), (n,))
  tok, logp = jax.jit(lambda l, u: S.choose_token(l, u, temperature=temperature, top_k=top_k,
                                                  top_p=top_p))(logits_NV, u_N)
  tok, logp = np.asarray(tok), np.asarray(logp)
  return np.bincount(tok, minlength=logits.shape[0]), tok, logp


@pytest.mark.parametrize("V,temperature,top_k,top_p", FREQ_CASES)
def test_sampled_token_frequencies_match_softmax(V, temperature, top_k, top_p):
  """Chi-square goodness of fit of 40,000 draws against softmax(truncated logits / T).

  Level: the test fails when p < 1e-3 (fixed seed, so the outcome is deterministic).
  Tokens outside the top-k / nucleus must never be drawn, and each draw's log-prob
  is the reference's.
  """
  from scipy import stats
  logits = np.random.RandomState(V).normal(size=V) * 1.5
  probs = _np_probs(logits, temperature, top_k, top_p)
  n = 40_000
  counts, tok, logp = _draw_counts(logits, temperature, top_k, top_p, n, seed=0)
  assert counts[probs == 0].sum() == 0
  live = probs > 0
  assert stats.chisquare(counts[live], n * probs[live]).pvalue > 1e-3
  np.testing.assert_allclose(logp, np.log(probs[tok]), atol=1e-5)


def test_frequency_test_detects_a_wrong_temperature():
  """The same check rejects draws from T = 1 judged against T = 0.8 (it can fail)."""
  from scipy import stats
  logits = np.random.RandomState(37).normal(size=37) * 1.5
  counts, _, _ = _draw_counts(logits, 1.0, 0, 1.0, 40_000, seed=0)
  assert stats.chisquare(counts, 40_000 * _np_probs(logits, 0.8, 0, 1.0)).pvalue < 1e-3


def test_inverse_cdf_never_draws_a_zero_probability_token():
  """Uniforms at 0, near 1 and at every block edge, with -inf runs at both ends and inside."""
  V = 37  # blocks of 7
  logits = np.random.RandomState(0).normal(size=V).astype(np.float32)
  logits[:9] = logits[-9:] = logits[15:22] = -np.inf
  p = np.exp(logits - logits.max())
  p /= p.sum()
  edges = np.cumsum(p)
  u = np.clip(np.concatenate([[0.0, 1 - 2**-24], edges, np.nextafter(edges, 0),
                              np.nextafter(edges, 1)]), 0, 1 - 2**-24).astype(np.float32)
  tok, logp = S.draw_categorical(jnp.broadcast_to(jnp.asarray(logits), (len(u), V)),
                                 jnp.asarray(u))
  tok = np.asarray(tok)
  assert np.all(np.isfinite(logits[tok])), tok[~np.isfinite(logits[tok])]
  np.testing.assert_allclose(np.asarray(logp), np.log(p[tok]), atol=1e-5)
