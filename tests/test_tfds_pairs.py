"""TFDS builder: JSONL -> ArrayRecord -> grain, skipped records, safe rebuilds."""
import json

import numpy as np
import pytest

from data_pipeline import grain_pipeline as gp
from data_pipeline import safe_pickle
from data_pipeline import tfds_pairs
from data_pipeline.tfds_pairs import deepimagine_pairs as dp


def make_records(data_root, n=12):
  d = safe_pickle.load(data_root / "ct_open" / "Summer_2025.pickle")
  recs = []
  for i, ((nct, ep), v) in enumerate(sorted(d.items())[:n]):
    opts = list(v["question_list_of_lists"][0])
    recs.append({
        "id": f"{nct}|q{i}", "source": "ct_open", "kind": "question", "perturbation": "",
        "trial_id": nct, "anchor_trial_id": "", "options": opts, "label": i % len(opts),
        "prompt": v["brief_title"] + "\n" + "\n".join(opts),
        "completion": "DECISION: (1, 0)" if len(opts) == 2 else "DECISION: (1, 0, 0)",
        "split": "train" if i < 8 else "dev", "category": f"{len(opts)}-way/explicit",
        "nct_id": nct, "endpoint_str": ep, "question_index": 0, "n_options": len(opts)})
  return recs


def write_jsonl(path, recs, extra_lines=()):
  with open(path, "w", encoding="utf-8") as f:
    for r in recs:
      f.write(json.dumps(r) + "\n")
    for line in extra_lines:
      f.write(line + "\n")
  return path


def decode(rec):
  out = {}
  for k, v in rec.items():
    if isinstance(v, bytes):
      v = v.decode()
    elif isinstance(v, (list, np.ndarray)) and k == "options":
      v = [o.decode() if isinstance(o, bytes) else o for o in v]
    elif isinstance(v, np.integer):
      v = int(v)
    out[k] = v
  return out


def test_build_and_read_round_trip(data_root, tmp_path):
  recs = make_records(data_root)
  bad = ["{not json", json.dumps({"id": "no-prompt"}),
         json.dumps({**recs[0], "id": "bad-label", "label": 5}),
         json.dumps(recs[1])]  # a duplicate id
  jsonl = write_jsonl(tmp_path / "pairs.jsonl", recs, bad)
  builder = tfds_pairs.build_tfds(jsonl, tmp_path / "tfds")
  assert dict(builder.skipped) == {"bad_json": 1, "missing_prompt": 1,
                                   "label_out_of_range": 1, "duplicate_id": 1}
  by_id = {r["id"]: r for r in recs}
  for split, n in (("train", 8), ("dev", 4)):
    src = tfds_pairs.load_tfds_source(tmp_path / "tfds", split)
    assert len(src) == n
    got = [decode(src[i]) for i in range(len(src))]
    for g in got:
      assert g == by_id[g["id"]]
    assert {g["id"] for g in got} == {r["id"] for r in recs if r["split"] == split}


def test_tfds_source_feeds_grain(data_root, tmp_path):
  from deepimagine_jax.tokenizer import Tokenizer
  recs = make_records(data_root)
  tfds_pairs.build_tfds(write_jsonl(tmp_path / "p.jsonl", recs), tmp_path / "tfds")
  src = tfds_pairs.load_tfds_source(tmp_path / "tfds", "train")
  tok = Tokenizer.train([r["prompt"] for r in recs], tmp_path / "tok", vocab_size=400)
  kw = dict(seq_len=64, global_batch_size=4, seed=0, num_epochs=1, shard_index=0, shard_count=1)
  from_tfds = [tuple(r) for b in gp.make_sft_iterator(src, tok, **kw) for r in b["inputs"]]
  train = [r for r in recs if r["split"] == "train"]
  from_dicts = [tuple(r) for b in gp.make_sft_iterator(train, tok, **kw) for r in b["inputs"]]
  assert len(from_tfds) == 8 and sorted(from_tfds) == sorted(from_dicts)
  prompt_kw = dict(prompt_len=32, batch_size=4, seed=0, num_epochs=1, shard_index=0,
                   shard_count=1)

  def rows(batches):  # (prompt tokens, label, n_options) of every row
    return sorted((tuple(r), label, n) for b in batches for r, label, n in zip(
        b["prompt_tokens"], b["labels"], b["n_options"]))
  from_tfds = rows(gp.make_prompt_iterator(src, tok, **prompt_kw))
  assert all(isinstance(label, int) for _, label, _ in from_tfds)
  assert from_tfds == rows(gp.make_prompt_iterator(train, tok, **prompt_kw))


def test_failed_rebuild_keeps_previous_build(data_root, tmp_path, monkeypatch):
  recs = make_records(data_root)
  data_dir = tmp_path / "tfds"
  tfds_pairs.build_tfds(write_jsonl(tmp_path / "v1.jsonl", recs), data_dir)

  def boom(self, recs_):
    yield recs_[0]["id"], recs_[0]
    raise RuntimeError("disk full halfway")
  v2 = [{**r, "prompt": "v2 " + r["prompt"]} for r in recs]
  with monkeypatch.context() as m:
    m.setattr(dp.DeepimaginePairs, "_generate_examples", boom)
    with pytest.raises(RuntimeError, match="disk full"):
      tfds_pairs.build_tfds(write_jsonl(tmp_path / "v2.jsonl", v2), data_dir)
  src = tfds_pairs.load_tfds_source(data_dir, "train")
  assert len(src) == 8
  assert all(not decode(src[i])["prompt"].startswith("v2 ") for i in range(len(src)))
  assert [p.name for p in data_dir.iterdir()] == ["deepimagine_pairs"]  # staging removed
  # A successful rebuild does replace the old data.
  tfds_pairs.build_tfds(tmp_path / "v2.jsonl", data_dir)
  src = tfds_pairs.load_tfds_source(data_dir, "train")
  assert all(decode(src[i])["prompt"].startswith("v2 ") for i in range(len(src)))
  assert [p.name for p in (data_dir / "deepimagine_pairs").iterdir()] == ["1.0.0"]


@pytest.mark.parametrize("change,reason", [
    ({"options": ["only one"]}, "bad_option_count"),
    ({"options": ["a", 3]}, "bad_type_options"),
    ({"label": True}, "bad_type_label"),
    ({"n_options": 3}, "n_options_mismatch"),
    ({"split": "train/x"}, "bad_split_name"),
    ({"prompt": None}, "bad_type_prompt"),
])
def test_validate_record_reasons(change, reason):
  rec = {"id": "a", "prompt": "p", "completion": "c", "split": "train",
         "options": ["x", "y"], "label": 1}
  ok, why = tfds_pairs.validate_record(rec)
  assert why == "" and ok["n_options"] == 2 and ok["question_index"] == -1 and ok["kind"] == ""
  assert tfds_pairs.validate_record({**rec, **change}) == (None, reason)


def test_missing_build_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no built deepimagine_pairs"):
    tfds_pairs.load_tfds_source(tmp_path / "nothing", "train")
