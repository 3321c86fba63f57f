"""Similar-trial retrieval: TF-IDF over intervention + condition + outcome text.

Approximate counterfactual pairs need trials that test the same thing under one
changed factor; TF-IDF cosine on what was given, for what, measured how, finds
candidates cheaply. scikit-learn does the weighting; rows are L2-normalised, so
a dot product is the cosine.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from data_pipeline.schema import Trial


def trial_text(trial: Trial) -> str:
  """Interventions, conditions and outcome titles: the parts that define 'similar'."""
  parts = list(trial.conditions)
  for arm in trial.arms:
    parts.extend(iv.name for iv in arm.interventions)
  parts.extend(o.title for o in trial.outcomes)
  return " . ".join(p for p in parts if p)


class TrialIndex:
  """Cosine nearest neighbours over trials (or over `{id: text}`)."""

  def __init__(self, trials: Sequence[Trial] | Mapping[str, str]):
    if isinstance(trials, Mapping):
      self.ids = list(trials)
      texts = [trials[i] for i in self.ids]
    else:
      self.ids = [t.id for t in trials]
      texts = [trial_text(t) for t in trials]
    if len(set(self.ids)) != len(self.ids):
      raise ValueError("TrialIndex: duplicate trial ids")
    self._row = {tid: i for i, tid in enumerate(self.ids)}
    self.vectorizer = TfidfVectorizer(
        lowercase=True, stop_words="english", sublinear_tf=True, min_df=1,
        token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z0-9\-]+\b")
    self.tfidf_NV = self.vectorizer.fit_transform(texts) if texts else None  # rows L2-normalised

  def __len__(self) -> int:
    return len(self.ids)

  def __contains__(self, trial_id: str) -> bool:
    return trial_id in self._row

  def scores(self, query: Trial | str) -> np.ndarray:
    """Cosine similarity [N] of `query` (a Trial, an indexed id, or free text) to every row."""
    if self.tfidf_NV is None:
      return np.zeros((0,), np.float64)
    if isinstance(query, Trial):
      query_1V = self.vectorizer.transform([trial_text(query)])
    elif query in self._row:
      query_1V = self.tfidf_NV[self._row[query]]
    else:
      query_1V = self.vectorizer.transform([query])
    return np.asarray((self.tfidf_NV @ query_1V.T).todense()).ravel()

  def nearest(self, query: Trial | str, k: int, min_score: float = 0.0,
              exclude: frozenset[str] | set[str] = frozenset()) -> list[tuple[str, float]]:
    """Up to k (id, cosine) best first, never the query's own id; ties by id."""
    scores_N = self.scores(query)
    own = query.id if isinstance(query, Trial) else query
    order = sorted(range(len(scores_N)), key=lambda i: (-scores_N[i], self.ids[i]))
    out = []
    for i in order:
      tid = self.ids[i]
      if tid == own or tid in exclude or scores_N[i] <= min_score:
        continue
      out.append((tid, float(scores_N[i])))
      if len(out) == k:
        break
    return out
