"""retrieval: TF-IDF, BM25 and dense scores against plain NumPy / Python references,
masked top-k against a sort, the saved index."""
import hashlib
import json
import math
import re

import numpy as np
import pytest
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from data_pipeline import retrieval

DOCS = ("Aspirin for chronic pain . pain score at week 12",
        "Ibuprofen versus placebo in chronic low back pain . pain intensity",
        "Metformin in type 2 diabetes . HbA1c at week 24",
        "Insulin glargine in type 2 diabetes . HbA1c . hypoglycaemia",
        "Aspirin aspirin aspirin in stroke prevention . recurrent stroke")
IDS = tuple(f"NCT{i}" for i in range(len(DOCS)))
QUERIES = ("aspirin pain", "type 2 diabetes HbA1c", "stroke", "zzz unknown words")


def _words(text):
  return [w for w in re.findall(r"\b[a-zA-Z][a-zA-Z0-9\-]+\b", text.lower())
          if w not in ENGLISH_STOP_WORDS]


def test_tfidf_matches_a_plain_numpy_cosine():
  vocab = sorted({w for d in DOCS for w in _words(d)})
  col = {w: i for i, w in enumerate(vocab)}
  n = len(DOCS)
  df = np.zeros(len(vocab))
  for d in DOCS:
    for w in set(_words(d)):
      df[col[w]] += 1
  idf = np.log((1 + n) / (1 + df)) + 1  # smoothed idf

  def vec(text):
    v = np.zeros(len(vocab))
    for w in _words(text):
      if w in col:
        v[col[w]] += 1
    v = np.where(v > 0, 1 + np.log(np.maximum(v, 1)), 0) * idf  # sublinear tf
    norm = np.linalg.norm(v)
    return v / norm if norm else v

  ref = np.array([[vec(q) @ vec(d) for d in DOCS] for q in QUERIES])
  got = retrieval.TfidfRetriever(IDS, DOCS).scores(QUERIES)
  assert got.shape == (len(QUERIES), len(DOCS)) and got.dtype == np.float32
  np.testing.assert_allclose(got, ref, atol=1e-6)
  assert (got[3] == 0).all()


def test_bm25_matches_the_okapi_formula():
  docs = [_words(d) for d in DOCS]
  n, avg = len(docs), sum(map(len, docs)) / len(docs)
  k1, b = 1.5, 0.75

  def score(query, doc):
    s = 0.0
    for w in set(_words(query)):
      df = sum(w in d for d in docs)
      if df == 0:
        continue
      tf = doc.count(w)
      idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
      s += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(doc) / avg))
    return s

  ref = np.array([[score(q, d) for d in docs] for q in QUERIES])
  got = retrieval.Bm25Retriever(IDS, DOCS).scores(QUERIES)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  assert got[0].argmax() == 0 and got[2].argmax() == 4


def _bag_embed(texts):
  """A fixed random projection of word counts: a stand-in encoder, no model."""
  vocab = sorted({w for d in DOCS + QUERIES for w in _words(d)})
  proj = np.random.default_rng(0).normal(size=(len(vocab), 16))
  counts = np.array([[_words(t).count(w) for w in vocab] for t in texts], float)
  return counts @ proj + 1e-3


def test_dense_is_the_cosine_of_the_passed_in_embeddings():
  got = retrieval.make_retriever("dense", IDS, DOCS, _bag_embed).scores(QUERIES)
  q, d = _bag_embed(QUERIES), _bag_embed(DOCS)
  ref = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
      d / np.linalg.norm(d, axis=1, keepdims=True)).T
  np.testing.assert_allclose(got, ref, atol=1e-5)
  with pytest.raises(ValueError, match="data.retriever 'dense' needs an embed"):
    retrieval.make_retriever("dense", IDS, DOCS)
  with pytest.raises(ValueError, match="unknown retriever 'sbert'"):
    retrieval.make_retriever("sbert", IDS, DOCS)
  with pytest.raises(ValueError, match=r"shape \(5,\)"):
    retrieval.make_retriever("dense", IDS, DOCS, lambda texts: np.ones(len(texts)))


def test_top_k_masks_and_orders_like_a_sort(monkeypatch):
  monkeypatch.setattr(retrieval, "QUERY_BATCH", 4)  # several batches, a padded last one
  rng = np.random.default_rng(1)
  scores = rng.integers(-2, 5, size=(11, 9)).astype(np.float32)  # ties and non-positives
  allowed = rng.random((11, 9)) < 0.7
  for k in (1, 3, 12):
    best, rows, valid = retrieval.top_k(scores, allowed, k)
    assert best.shape == rows.shape == valid.shape == (11, k)
    for q in range(11):
      ok = [r for r in range(9) if allowed[q, r] and scores[q, r] > 0]
      ref = sorted(ok, key=lambda r: (-scores[q, r], r))[:k]
      assert list(rows[q][valid[q]]) == ref
      np.testing.assert_array_equal(best[q][valid[q]], scores[q, ref])
      assert valid[q].sum() == len(ref) and not valid[q, len(ref):].any()


def test_trial_text_and_saved_index(tmp_path):
  r = retrieval.TfidfRetriever(IDS, DOCS)
  meta = retrieval.save_index(tmp_path, r, ["2020-01-01"] * len(IDS))
  data = (tmp_path / "index.npz").read_bytes()
  assert meta == json.loads((tmp_path / "index.json").read_text())
  assert meta["sha256"] == hashlib.sha256(data).hexdigest() and meta["trials"] == len(IDS)
  with np.load(tmp_path / "index.npz", allow_pickle=False) as z:
    assert tuple(z["ids"]) == IDS and list(z["vocabulary"]) == list(
        r.vectorizer.get_feature_names_out())
    np.testing.assert_array_equal(z["indptr"], r.matrix_NV.indptr)


@pytest.mark.parametrize("name", ["tfidf", "bm25"])
@pytest.mark.parametrize("fraction, cap", [(0.3, 256), (0.3, 2), (2.0, 256)])
def test_common_terms_scored_densely_give_the_plain_sparse_product(monkeypatch, name,
                                                                  fraction, cap):
  """The dense block for common terms (retrieval._SplitWeights) is only a faster order of
  the same sum: query @ weights.T, whatever the split (all sparse, capped, none)."""
  monkeypatch.setattr(retrieval, "DENSE_DF_FRACTION", fraction)
  monkeypatch.setattr(retrieval, "DENSE_TERMS", cap)
  r = retrieval.make_retriever(name, IDS, DOCS)
  weights = r.matrix_NV if name == "tfidf" else r.weights_NV
  query = r.vectorizer.transform(QUERIES)
  if name == "bm25":
    query.data[:] = 1.0
  ref = (query @ weights.T).toarray()
  got = r.scores(QUERIES)
  df = [sum(w in _words(d) for d in DOCS) for w in {w for d in DOCS for w in _words(d)}]
  assert len(r.split.common) == min(cap, sum(x >= fraction * len(DOCS) for x in df))
  np.testing.assert_allclose(got, ref.astype(np.float32), rtol=1e-6, atol=0)
  assert (np.argsort(-got, axis=1, kind="stable")
          == np.argsort(-ref.astype(np.float32), axis=1, kind="stable")).all()
