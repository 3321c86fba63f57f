"""embed.Embedder: mean-pooled hidden states, checked against each text run alone."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepimagine_jax import model as model_lib
from deepimagine_jax.config import ModelConfig
from deepimagine_jax.embed import Embedder
from deepimagine_jax.tokenizer import Tokenizer

TEXTS = ["Metformin 500 mg versus placebo in adults with type 2 diabetes.",
         "Pembrolizumab for advanced melanoma; overall survival at 24 months.",
         "Vitamin D.", "A longer text about a randomised trial " * 8]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tok = Tokenizer.train(TEXTS * 20, tmp_path_factory.mktemp("tok"), vocab_size=400)
  cfg = ModelConfig.tiny().replace(vocab_size=tok.vocab_size, n_layers=1)
  graphdef, params = nnx.split(model_lib.Transformer(cfg, nnx.Rngs(0)))
  return tok, graphdef, params


def test_mean_of_real_tokens_matches_each_text_alone(setup):
  tok, graphdef, params = setup
  emb = Embedder(graphdef, params, tok, name="tiny", max_len=24, batch_size=3)
  got_ND = emb(TEXTS)
  assert got_ND.shape == (len(TEXTS), nnx.merge(graphdef, params).cfg.d_model)

  @jax.jit  # one text alone, unpadded (jitted: op-by-op dispatch compiles every op per length)
  def mean_hidden(params, ids):
    hidden, _ = nnx.merge(graphdef, params)(ids, jnp.arange(ids.shape[1])[None],
                                            return_hidden=True)
    return hidden[0].mean(0)

  for i, text in enumerate(TEXTS):
    head, body = tok.prompt_ids(text)
    ids = np.asarray((head + body)[:24], np.int32)[None]
    np.testing.assert_allclose(got_ND[i], mean_hidden(params, ids), rtol=1e-4, atol=1e-5)
  # Batch padding and batch size change nothing; the cut text is the long one.
  np.testing.assert_allclose(Embedder(graphdef, params, tok, name="tiny", max_len=24,
                                      batch_size=1)(TEXTS), got_ND, rtol=1e-5, atol=1e-6)
  assert emb.tokens(TEXTS)[2] == 1


def test_repr_names_model_and_settings(setup):
  tok, graphdef, params = setup
  a = Embedder(graphdef, params, tok, name="/ckpt/x", max_len=24, batch_size=3)
  b = Embedder(graphdef, params, tok, name="/ckpt/x", max_len=24, batch_size=8)
  assert repr(a) == repr(b) and "/ckpt/x" in repr(a) and "max_len=24" in repr(a)
  assert repr(a) != repr(Embedder(graphdef, params, tok, name="/ckpt/x", max_len=32,
                                  batch_size=3))
  with pytest.raises(ValueError, match="max_len"):
    Embedder(graphdef, params, tok, name="x", max_len=1, batch_size=3)
