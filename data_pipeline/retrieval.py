"""Anchor retrieval: score a target trial against the anchor pool, pick the k best allowed.

One interface (`Retriever`: `ids`, `scores(texts) -> [Q, N]`, `arrays()`) and three
scorers over the trial text (title, conditions, interventions, outcome titles):
TF-IDF cosine and Okapi BM25 (no model needed), and dense cosine over embeddings
from an `embed(texts) -> [N, D]` the caller passes in (mean-pooled hidden states of
a decoder: the pipeline never imports the model, as with the tokenizer trainer).
Whichever scores, `top_k` picks the k best rows per query on device with
`jax.lax.top_k` after masking the rows a query may not use (the time rule, its own
trial), in fixed-size query batches so it compiles once; ties go to the lower row.
"""
from __future__ import annotations

import functools
import hashlib
import pathlib
from io import BytesIO
from typing import Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer

from data_pipeline import io
from data_pipeline.schema import Trial

RETRIEVERS = ("tfidf", "bm25", "dense")
QUERY_BATCH = 256  # queries per top_k call: one compiled shape
_TOKENS = r"(?u)\b[a-zA-Z][a-zA-Z0-9\-]+\b"
BM25_K1, BM25_B = 1.5, 0.75
# Terms in at least this share of the pool (at most DENSE_TERMS of them) are scored by a
# dense matmul: a sparse product pays per (query term, document) and such terms are in
# nearly every document, so they made sparse scoring cost ~queries x pool x their number.
DENSE_DF_FRACTION = 1 / 16
DENSE_TERMS = 256

# embed(texts) -> float array [len(texts), D]: one row per text (e.g. mean-pooled hidden
# states); the dense retriever normalises rows, so a dot product is the cosine.
Embed = Callable[[Sequence[str]], np.ndarray]


def trial_text(trial: Trial) -> str:
  """Title, conditions, interventions and outcome titles: what defines 'similar'."""
  parts = [trial.title, *trial.conditions]
  for arm in trial.arms:
    parts.extend(iv.name for iv in arm.interventions)
  parts.extend(o.title for o in trial.outcomes)
  return " . ".join(p for p in parts if p)


class Retriever(Protocol):
  name: str
  ids: tuple[str, ...]

  def scores(self, texts: Sequence[str]) -> np.ndarray:
    """Similarity [len(texts), len(ids)] float32, higher is nearer; 0 = nothing shared."""

  def arrays(self) -> dict[str, np.ndarray]:
    """What the index is, as arrays (saved with the build)."""


class TfidfRetriever:
  """Cosine of sublinear TF-IDF vectors (rows L2-normalised, so a dot product is the cosine)."""
  name = "tfidf"

  def __init__(self, ids: Sequence[str], texts: Sequence[str]):
    self.ids = tuple(ids)
    self.vectorizer = TfidfVectorizer(lowercase=True, stop_words="english", sublinear_tf=True,
                                      token_pattern=_TOKENS)
    self.matrix_NV = self.vectorizer.fit_transform(texts)
    self.split = _SplitWeights(self.matrix_NV)

  def scores(self, texts: Sequence[str]) -> np.ndarray:
    return self.split.scores(self.vectorizer.transform(texts))

  def arrays(self) -> dict[str, np.ndarray]:
    return {"vocabulary": self.vectorizer.get_feature_names_out().astype(str),
            "idf": self.vectorizer.idf_, **_sparse_arrays(self.matrix_NV)}


class Bm25Retriever:
  """Okapi BM25 (k1 1.5, b 0.75, idf log(1 + (N - df + 0.5) / (df + 0.5))): a query
  scores the sum of its distinct terms' weights in each document."""
  name = "bm25"

  def __init__(self, ids: Sequence[str], texts: Sequence[str]):
    self.ids = tuple(ids)
    self.vectorizer = CountVectorizer(lowercase=True, stop_words="english", token_pattern=_TOKENS)
    tf_NV = self.vectorizer.fit_transform(texts).tocsr().astype(np.float64)
    n_docs = tf_NV.shape[0]
    df_V = np.bincount(tf_NV.indices, minlength=tf_NV.shape[1])
    self.idf_V = np.log1p((n_docs - df_V + 0.5) / (df_V + 0.5))
    length_N = np.asarray(tf_NV.sum(axis=1)).ravel()
    norm_N = BM25_K1 * (1 - BM25_B + BM25_B * length_N / max(length_N.mean(), 1e-9))
    rows_nnz = np.repeat(np.arange(n_docs), np.diff(tf_NV.indptr))
    tf = tf_NV.data
    self.weights_NV = tf_NV.copy()
    self.weights_NV.data = self.idf_V[tf_NV.indices] * tf * (BM25_K1 + 1) / (tf + norm_N[rows_nnz])
    self.split = _SplitWeights(self.weights_NV)

  def scores(self, texts: Sequence[str]) -> np.ndarray:
    query_QV = self.vectorizer.transform(texts)
    query_QV.data[:] = 1.0  # distinct query terms
    return self.split.scores(query_QV)

  def arrays(self) -> dict[str, np.ndarray]:
    return {"vocabulary": self.vectorizer.get_feature_names_out().astype(str),
            "idf": self.idf_V, **_sparse_arrays(self.weights_NV)}


class _SplitWeights:
  """`query_QV @ weights_NV.T` (float64, as float32) with the common terms' columns as a
  dense [common terms, N] block (BLAS) and the rest sparse, so the cost grows with the rare terms'
  document frequencies rather than queries x pool x common terms."""

  def __init__(self, weights_NV):
    weights_NV = weights_NV.tocsc()
    df_V = np.diff(weights_NV.indptr)
    by_df = np.argsort(-df_V, kind="stable")[:DENSE_TERMS]
    self.common = np.sort(by_df[df_V[by_df] >= DENSE_DF_FRACTION * weights_NV.shape[0]])
    self.common_weights = weights_NV[:, self.common].toarray().T
    rare_V = np.ones(weights_NV.shape[1])
    rare_V[self.common] = 0.0
    rare_NV = weights_NV @ sparse.diags(rare_V)
    rare_NV.eliminate_zeros()
    self.rare_VN = rare_NV.T.tocsr()

  def scores(self, query_QV) -> np.ndarray:
    query_QV = query_QV.tocsr()
    scores_QN = (query_QV @ self.rare_VN).toarray()
    scores_QN += query_QV[:, self.common].toarray() @ self.common_weights
    return scores_QN.astype(np.float32)


class DenseRetriever:
  """Cosine of embeddings from `embed`, by a matmul on device."""
  name = "dense"

  def __init__(self, ids: Sequence[str], texts: Sequence[str], embed: Embed):
    self.ids = tuple(ids)
    self.embed = embed
    self.index_ND = _unit_rows(embed(list(texts)), "index")

  def scores(self, texts: Sequence[str]) -> np.ndarray:
    query_QD = _unit_rows(self.embed(list(texts)), "query")
    return np.asarray(_cosine(jnp.asarray(query_QD), jnp.asarray(self.index_ND)))

  def arrays(self) -> dict[str, np.ndarray]:
    return {"embeddings": self.index_ND}


def make_retriever(name: str, ids: Sequence[str], texts: Sequence[str],
                   embed: Embed | None = None) -> Retriever:
  """The retriever called `name` (data.retriever) fitted on the pool's texts."""
  if name == "tfidf":
    return TfidfRetriever(ids, texts)
  if name == "bm25":
    return Bm25Retriever(ids, texts)
  if name == "dense":
    if embed is None:
      raise ValueError("data.retriever 'dense' needs an embed(texts) -> [N, D] function "
                       "passed to build_dataset (embed=...)")
    return DenseRetriever(ids, texts, embed)
  raise ValueError(f"data.retriever: unknown retriever {name!r}; known: {list(RETRIEVERS)}")


def _unit_rows(x, what: str) -> np.ndarray:
  x_ND = np.asarray(x, np.float32)
  if x_ND.ndim != 2 or not np.isfinite(x_ND).all():
    raise ValueError(f"dense retriever: embed() gave {what} embeddings of shape {x_ND.shape} "
                     "(need [texts, D], finite)")
  return x_ND / np.maximum(np.linalg.norm(x_ND, axis=1, keepdims=True), 1e-12)


@jax.jit
def _cosine(query_QD, index_ND):
  return query_QD @ index_ND.T


def _sparse_arrays(m) -> dict[str, np.ndarray]:
  m = m.tocsr()
  return {"data": m.data, "indices": m.indices, "indptr": m.indptr, "shape": np.array(m.shape)}


@functools.partial(jax.jit, static_argnames=("k",))
def _masked_top_k(scores_QN, allowed_QN, k: int):
  """k best allowed rows per query; rows not allowed or scoring <= 0 come back invalid."""
  masked_QN = jnp.where(allowed_QN & (scores_QN > 0), scores_QN, -jnp.inf)
  best_QK, rows_QK = jax.lax.top_k(masked_QN, k)
  return best_QK, rows_QK, jnp.isfinite(best_QK)


def top_k(scores_QN: np.ndarray, allowed_QN: np.ndarray, k: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(scores [Q, k], rows [Q, k], valid [Q, k]): each query's k best allowed rows with a
  positive score, best first (ties to the lower row); `valid` is False past the last one."""
  n_queries, n_rows = scores_QN.shape
  k_eff = min(k, n_rows)
  out = [np.zeros((n_queries, k), np.float32), np.zeros((n_queries, k), np.int64),
         np.zeros((n_queries, k), bool)]
  for start in range(0, n_queries, QUERY_BATCH):
    stop = min(start + QUERY_BATCH, n_queries)
    s_BN = np.zeros((QUERY_BATCH, n_rows), np.float32)
    a_BN = np.zeros((QUERY_BATCH, n_rows), bool)
    s_BN[:stop - start], a_BN[:stop - start] = scores_QN[start:stop], allowed_QN[start:stop]
    for o, x in zip(out, _masked_top_k(s_BN, a_BN, k_eff)):
      o[start:stop, :k_eff] = np.asarray(x)[:stop - start]
  return tuple(out)


def save_index(directory: pathlib.Path, retriever: Retriever, public_dates: Sequence[str]
               ) -> dict:
  """Writes `index.npz` (the retriever's arrays, the pool's trial ids and public dates)
  and `index.json` (name, size, sha256 of the npz); returns the JSON."""
  buf = BytesIO()
  np.savez_compressed(buf, ids=np.array(retriever.ids), public_dates=np.array(public_dates),
                      **retriever.arrays())
  data = buf.getvalue()
  io.atomic_write(directory / "index.npz", data)
  meta = {"retriever": retriever.name, "trials": len(retriever.ids),
          "sha256": hashlib.sha256(data).hexdigest()}
  io.write_json(directory / "index.json", meta, sort_keys=True)
  return meta
