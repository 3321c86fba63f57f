"""TFDS builder: example records (JSON lines) -> ArrayRecord splits.

Builds without TensorFlow. The JSONL path is a constructor argument, not part of
the dataset's identity: the built dataset is read back with
`load_tfds_source(data_dir, split)`, which needs no path and feeds
`grain.MapDataset.source` directly. Splits come from each record's `split`.

A rebuild writes into a staging folder and swaps the finished version folder in
by renames, so a build that fails halfway leaves the previous one readable.
Malformed records are counted per reason, logged and skipped; they never stop a build.
"""
from __future__ import annotations

import collections
import logging
import os
import pathlib
import re
import shutil
import tempfile

import numpy as np
import tensorflow_datasets as tfds

from data_pipeline import io
from data_pipeline.build_report import BuildReport

TEXT_FIELDS = ("id", "source", "kind", "perturbation", "trial_id", "anchor_trial_id",
               "prompt", "completion", "split", "category", "nct_id", "endpoint_str")
INT_FIELDS = ("label", "question_index", "n_options")
REQUIRED = ("id", "prompt", "completion", "split", "options", "label")
# Absent optional fields take the design's "not CT Open / no anchor" values.
DEFAULTS = {"question_index": -1}
_SPLIT_NAME = re.compile(r"^\w+$")


def validate_record(rec) -> tuple[dict | None, str]:
  """Returns (feature dict, "") or (None, reason) for one parsed JSON value."""
  if not isinstance(rec, dict):
    return None, "not_an_object"
  for key in REQUIRED:
    if key not in rec:
      return None, f"missing_{key}"
  out = {}
  for key in TEXT_FIELDS:
    value = rec.get(key, "")
    if not isinstance(value, str):
      return None, f"bad_type_{key}"
    out[key] = value
  options = rec["options"]
  if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
    return None, "bad_type_options"
  if not 2 <= len(options) <= 3:
    return None, "bad_option_count"
  out["options"] = options
  for key in ("label", "question_index"):
    value = rec.get(key, DEFAULTS.get(key))
    if isinstance(value, bool) or not isinstance(value, int):
      return None, f"bad_type_{key}"
    out[key] = value
  if not 0 <= out["label"] < len(options):
    return None, "label_out_of_range"
  if "n_options" in rec and rec["n_options"] != len(options):
    return None, "n_options_mismatch"
  out["n_options"] = len(options)
  if not _SPLIT_NAME.match(out["split"]):
    return None, "bad_split_name"
  return out, ""


class DeepimaginePairs(tfds.core.GeneratorBasedBuilder):
  """Counterfactual pairs and questions as prompt/completion records."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def __init__(self, *, jsonl_path: str | os.PathLike | None = None, **kwargs):
    self._jsonl_path = jsonl_path
    self.skipped: collections.Counter = collections.Counter()
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {k: tfds.features.Text() for k in TEXT_FIELDS}
    features.update({k: np.int64 for k in INT_FIELDS})
    features["options"] = tfds.features.Sequence(tfds.features.Text())
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features))

  def _read(self) -> dict[str, list[dict]]:
    """Valid records grouped by split; bad lines counted in `self.skipped`."""
    if self._jsonl_path is None:
      raise ValueError("DeepimaginePairs: pass jsonl_path=... to build the dataset")
    path = pathlib.Path(self._jsonl_path)
    by_split: dict[str, list[dict]] = collections.defaultdict(list)
    seen_ids: set[str] = set()
    bad_lines = BuildReport()
    self.skipped.clear()
    for rec in io.read_jsonl(path, bad_lines, "tfds"):
      rec, reason = validate_record(rec)
      if rec is not None and rec["id"] in seen_ids:
        rec, reason = None, "duplicate_id"
      if rec is None:
        self.skipped[reason] += 1
        continue
      seen_ids.add(rec["id"])
      by_split[rec["split"]].append(rec)
    self.skipped.update(bad_lines.skipped.get("tfds", {}))
    if self.skipped:
      logging.warning("%s: skipped %d records: %s", path, sum(self.skipped.values()),
                      dict(sorted(self.skipped.items())))
    if not by_split:
      raise ValueError(f"{path}: no valid records ({dict(self.skipped)})")
    return by_split

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(recs) for name, recs in sorted(self._read().items())}

  def _generate_examples(self, recs):
    for rec in recs:
      yield rec["id"], rec


def build_tfds(jsonl_path: str | os.PathLike, data_dir: str | os.PathLike) -> DeepimaginePairs:
  """Builds (or rebuilds) the ArrayRecord dataset under data_dir from a JSONL file.

  TFDS itself deletes an existing build before generating a new one, so we build
  into a staging folder beside it and swap the finished version folder in with
  renames: a build that fails at any point leaves the previous build readable.
  """
  data_dir = pathlib.Path(data_dir)
  data_dir.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=".building-", dir=data_dir))
  try:
    staged = DeepimaginePairs(jsonl_path=jsonl_path, data_dir=os.fspath(staging),
                              file_format="array_record")
    staged.download_and_prepare()
    final = pathlib.Path(staged.data_dir.replace(os.fspath(staging), os.fspath(data_dir), 1))
    final.parent.mkdir(parents=True, exist_ok=True)
    io.swap_in(staged.data_dir, final)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  builder = DeepimaginePairs(data_dir=os.fspath(data_dir))
  builder.skipped = staged.skipped
  return builder


def load_tfds_source(data_dir: str | os.PathLike, split: str):
  """A random-access source of the records of `split`, ready for grain.MapDataset.source.

  Text features come back as bytes; `grain_pipeline` decodes them.
  """
  builder = DeepimaginePairs(data_dir=os.fspath(data_dir))
  if not builder.is_prepared():
    raise FileNotFoundError(f"no built deepimagine_pairs dataset under {data_dir}")
  return builder.as_data_source(split=split)
