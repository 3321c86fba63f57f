"""Grain pipeline: masks, truncation, packing, resume, host shards, global arrays."""
import json

import grain
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from data_pipeline import grain_pipeline as gp
from data_pipeline import safe_pickle
from data_pipeline.example import Example
from deepimagine_jax.tokenizer import Tokenizer
import tokenizer_files


def ct_open_records(data_root, limit=None):
  """Small Examples: CT Open title + options as prompt, a DECISION line."""
  d = safe_pickle.load(data_root / "ct_open" / "Winter_2025.pickle")
  recs = []
  for (nct, ep), v in sorted(d.items()):
    for qi, opts in enumerate(v["question_list_of_lists"]):
      label = list(opts).index(v["answer_list_of_lists"][qi]) if v["answer_list_of_lists"][qi] in opts else 0
      scores = ", ".join("1" if i == label else "0" for i in range(len(opts)))
      prompt = v["brief_title"] + "\n" + "\n".join(f"{i + 1}. {o}" for i, o in enumerate(opts))
      recs.append(Example(id=f"{nct}|{ep}|{qi}", source="ct_open", kind="question",
                          trial_id=nct, prompt=prompt, completion=f"DECISION: ({scores})",
                          options=tuple(opts), label=label, split="train"))
  return recs[:limit]


def _prompt_rows(batches):
  """(kept prompt tokens, label, n_options) of every row of RL prompt batches."""
  return [(tuple(row[mask == 1]), label, n)
          for b in batches for row, mask, label, n in zip(
              b["prompt_tokens"], b["prompt_mask"], b["labels"], b["n_options"])]


@pytest.fixture(scope="module")
def records(data_root):
  return ct_open_records(data_root, limit=96)


@pytest.fixture(scope="module")
def tok(records, tmp_path_factory):
  return Tokenizer.train([r.prompt + "\n" + r.completion for r in records],
                         tmp_path_factory.mktemp("tok"), vocab_size=600)


def take(it, n):
  return [next(it) for _ in range(n)]


def test_loss_mask_covers_completion_and_eos(records, tok):
  rec = records[0]
  p, c = tok.encode(rec.prompt), tok.encode(rec.completion)
  ex = gp.pad_tokens(gp.sft_tokens(rec, tok, seq_len=256), 256)
  n = 1 + len(p) + len(c)  # inputs: BOS + prompt + completion (EOS is only a target)
  assert ex["inputs"][0] == tok.bos_id
  np.testing.assert_array_equal(ex["inputs"][:n], [tok.bos_id] + p + c)
  np.testing.assert_array_equal(ex["targets"][:n], p + c + [tok.eos_id])
  masked = ex["targets"][ex["loss_mask"] == 1.0]
  np.testing.assert_array_equal(masked, c + [tok.eos_id])
  assert ex["loss_mask"][:len(p)].sum() == 0
  # Padding: zeros everywhere past n, one segment, positions 0..n-1.
  assert (ex["inputs"][n:] == 0).all() and (ex["targets"][n:] == 0).all()
  assert (ex["loss_mask"][n:] == 0).all()
  np.testing.assert_array_equal(ex["segment_ids"], [1] * n + [0] * (256 - n))
  np.testing.assert_array_equal(ex["positions"][:n], np.arange(n))
  assert ex["inputs"].dtype == np.int32 and ex["loss_mask"].dtype == np.float32


def test_truncation_drops_prompt_from_the_left(records, tok):
  rec = records[1]
  p, c = tok.encode(rec.prompt), tok.encode(rec.completion)
  seq_len = len(c) + 10
  ex = gp.sft_tokens(rec, tok, seq_len=seq_len)
  assert len(ex["inputs"]) == seq_len
  assert ex["inputs"][0] == tok.bos_id
  full = [tok.bos_id] + p + c + [tok.eos_id]
  expected = full[:1] + full[-seq_len:]  # BOS + last seq_len tokens
  np.testing.assert_array_equal(ex["inputs"], expected[:-1])
  np.testing.assert_array_equal(ex["targets"], expected[1:])
  assert ex["loss_mask"].sum() == len(c) + 1


def test_completion_longer_than_seq_len_keeps_its_end(tok):
  rec = Example(id="x", source="ct_open", kind="question", trial_id="T", options=("a", "b"),
                label=0, prompt="short", completion="word " * 50 + "DECISION: (1, 0)")
  c = tok.encode(rec.completion)
  ex = gp.sft_tokens(rec, tok, seq_len=8)
  np.testing.assert_array_equal(ex["targets"], (c + [tok.eos_id])[-8:])
  assert ex["loss_mask"].sum() == 8


@pytest.fixture(scope="module")
def chat_tok(records, tmp_path_factory):
  """A Gemma-shaped tokenizer with its chat template (tests/tokenizer_files.py)."""
  folder = tokenizer_files.gemma_sentencepiece(
      tmp_path_factory.mktemp("gemma"), [r.prompt + "\n" + r.completion for r in records],
      vocab_size=600)
  return Tokenizer.load(folder)


def test_chat_template_sequences_and_truncation(records, chat_tok):
  """Gemma's turn markup around the prompt; the answer ends in <end_of_turn>; cuts keep both ends."""
  rec = records[1]
  opening = chat_tok.encode("<bos><start_of_turn>user\n")
  prompt = chat_tok.encode(f"<bos><start_of_turn>user\n{rec.prompt}<end_of_turn>\n"
                           "<start_of_turn>model\n")
  completion = chat_tok.encode(rec.completion) + [chat_tok.encode("<end_of_turn>")[0]]
  assert prompt[:len(opening)] == opening and opening[:2] == [2, 5]  # <bos> <start_of_turn>
  full = prompt + completion
  ex = gp.sft_tokens(rec, chat_tok, seq_len=len(full) + 5)
  np.testing.assert_array_equal(ex["inputs"], full[:-1])
  np.testing.assert_array_equal(ex["targets"], full[1:])
  np.testing.assert_array_equal(ex["loss_mask"], [0] * (len(prompt) - 1) + [1] * len(completion))
  seq_len = len(completion) + 30  # the prompt's text loses tokens after the opening
  ex = gp.sft_tokens(rec, chat_tok, seq_len=seq_len)
  kept = opening + full[len(full) - (seq_len + 1 - len(opening)):]
  np.testing.assert_array_equal(ex["inputs"], kept[:-1])
  assert ex["loss_mask"].sum() == len(completion)
  row = gp.rl_prompt(rec, chat_tok, prompt_len=40)
  np.testing.assert_array_equal(row["prompt_tokens"],
                                opening + prompt[len(prompt) - (40 - len(opening)):])
  assert row["prompt_mask"].sum() == 40
  assert chat_tok.decode(row["prompt_tokens"]).endswith("<start_of_turn>model\n")
  h = len(opening)
  with pytest.raises(ValueError, match=f"{rec.id}'?: prompt_len {h - 1} cannot hold the "
                                       f"prompt's {h} opening"):
    gp.rl_prompt(rec, chat_tok, prompt_len=h - 1)


def test_missing_field_names_record(tok):
  # a TFDS-style row (a mapping) without a completion
  with pytest.raises(KeyError, match="'r7'.*'completion'"):
    gp.sft_tokens({"id": "r7", "prompt": "x"}, tok, seq_len=8)


def test_batches_cover_one_epoch_and_reshuffle(records, tok):
  it = gp.make_sft_iterator(records, tok, seq_len=512, global_batch_size=8, seed=3,
                            num_epochs=2, shard_index=0, shard_count=1)
  batches = list(it)
  assert len(batches) == 2 * len(records) // 8
  for b in batches:
    assert set(b) == set(gp.TOKEN_KEYS)
    assert all(v.shape == (8, 512) for v in b.values())
  def epoch_rows(bs):
    return [tuple(r[r != 0]) for b in bs for r in b["inputs"]]
  half = len(batches) // 2
  e1, e2 = epoch_rows(batches[:half]), epoch_rows(batches[half:])
  expected = sorted(tuple(gp.sft_tokens(r, tok, 512)["inputs"]) for r in records)
  assert sorted(e1) == expected and sorted(e2) == expected
  assert e1 != e2  # reshuffled each epoch


def check_packed_rows(batch, examples):
  """Every segment of a packed row is one whole unpacked example."""
  for b in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][b]
    for s in np.unique(seg[seg > 0]):
      idx = np.nonzero(seg == s)[0]
      assert (np.diff(idx) == 1).all()  # contiguous
      np.testing.assert_array_equal(batch["positions"][b, idx], np.arange(len(idx)))
      key = tuple(batch["inputs"][b, idx])
      assert key in examples
      ref = examples[key]
      np.testing.assert_array_equal(batch["targets"][b, idx], ref["targets"])
      np.testing.assert_array_equal(batch["loss_mask"][b, idx], ref["loss_mask"])
    pad = seg == 0
    assert (batch["inputs"][b, pad] == 0).all() and (batch["loss_mask"][b, pad] == 0).all()


def test_packing_segments_and_positions(records, tok):
  seq_len = 256
  examples = {tuple(e["inputs"]): e for e in (gp.sft_tokens(r, tok, seq_len) for r in records)}
  it = gp.make_sft_iterator(records, tok, seq_len=seq_len, global_batch_size=4, seed=0,
                            num_epochs=1, pack=True, shard_index=0, shard_count=1)
  batches = list(it)
  seen = 0
  for batch in batches:
    assert batch["inputs"].shape == (4, seq_len)
    check_packed_rows(batch, examples)
    seen += sum(len(np.unique(s[s > 0])) for s in batch["segment_ids"])
  assert max(batch["segment_ids"].max() for batch in batches) >= 2  # really packed
  assert seen <= len(records) and seen > len(records) // 2


@pytest.mark.parametrize("pack", [False, True])
def test_resume_matches_uninterrupted_run(records, tok, pack):
  def make():
    return gp.make_sft_iterator(records, tok, seq_len=128, global_batch_size=4, seed=11,
                                pack=pack, shard_index=0, shard_count=1)
  n, m = 5, 30  # 30 batches of 4 cross the 96-record epoch boundary unpacked
  reference = take(make(), n + m)
  it = make()
  take(it, n)
  state = json.dumps(it.get_state())  # a small dict of ints: JSON-serialisable
  assert json.loads(state) == it.get_state()
  resumed = make()
  resumed.set_state(json.loads(state))
  for a, b in zip(take(resumed, m), reference[n:]):
    for key in gp.TOKEN_KEYS:
      np.testing.assert_array_equal(a[key], b[key])


def test_orbax_saves_and_restores_iterator(records, tok, tmp_path):
  import orbax.checkpoint as ocp
  def make():
    return gp.make_sft_iterator(records, tok, seq_len=64, global_batch_size=4, seed=5,
                                shard_index=0, shard_count=1)
  it = make()
  take(it, 3)
  expected = take(make(), 4)[3]
  with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
    mgr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mgr.wait_until_finished()
    fresh = make()
    mgr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  np.testing.assert_array_equal(next(fresh)["inputs"], expected["inputs"])


def test_host_shards_are_disjoint_and_cover(tok):
  recs = [Example(id=f"r{i}", source="synthetic", kind="question", trial_id=f"T{i}",
                  prompt=f"trial {i}", completion="DECISION: (1, 0)", options=("a", "b"),
                  label=i % 2) for i in range(40)]

  def ids_of(batches):  # each prompt names its record: "trial {i}" -> "r{i}"
    return [f"r{tok.decode(list(row[1:])).split()[1]}"
            for row, _, _ in _prompt_rows(batches)]
  ids = []
  for shard in range(2):
    it = gp.make_prompt_iterator(recs, tok, prompt_len=16, batch_size=4, seed=1,
                                 num_epochs=1, shard_index=shard, shard_count=2)
    ids.append(ids_of(it))
  assert len(ids[0]) == len(ids[1]) == 20
  assert not set(ids[0]) & set(ids[1])
  assert set(ids[0]) | set(ids[1]) == {r.id for r in recs}
  # An odd count drops the remainder so hosts stay in step.
  odd = [ids_of(gp.make_prompt_iterator(recs[:39], tok, prompt_len=16, batch_size=2,
                                        seed=1, num_epochs=1, shard_index=shard,
                                        shard_count=2))
         for shard in range(2)]
  assert len(odd[0]) == len(odd[1]) == 19
  assert len(set(odd[0]) | set(odd[1])) == 38
  with pytest.raises(ValueError, match="does not split"):
    gp.make_prompt_iterator(recs, tok, prompt_len=16, batch_size=3, seed=1, shard_count=2,
                            shard_index=0)


def test_prompt_batches_left_padded(records, tok):
  # the median prompt length: both padding and truncation occur, whatever the data's lengths
  P_ = sorted(len(tok.encode(rec.prompt)) + 1 for rec in records)[len(records) // 2]
  batches = list(gp.make_prompt_iterator(records, tok, prompt_len=P_, batch_size=4, seed=2,
                                         num_epochs=1, shard_index=0, shard_count=1))
  expected = []  # every record once: its kept tokens, label and option count
  padded = truncated = 0
  for rec in records:
    full = [tok.bos_id] + tok.encode(rec.prompt)
    kept = full if len(full) <= P_ else full[:1] + full[-(P_ - 1):]
    padded += len(full) < P_
    truncated += len(full) > P_
    expected.append((tuple(kept), rec.label, len(rec.options)))
  for b in batches:
    assert b["prompt_tokens"].shape == (4, P_) and b["prompt_mask"].shape == (4, P_)
    for row, mask in zip(b["prompt_tokens"], b["prompt_mask"]):
      n = int(mask.sum())  # left padding: pad ids then the kept tokens
      assert (row[:P_ - n] == tok.pad_id).all()
      np.testing.assert_array_equal(mask, [0] * (P_ - n) + [1] * n)
  assert sorted(_prompt_rows(batches)) == sorted(expected)
  assert padded and truncated


def test_to_global_arrays_on_8_device_mesh(records, tok):
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
  it = gp.make_sft_iterator(records, tok, seq_len=32, global_batch_size=8, seed=0,
                            shard_index=0, shard_count=1)
  batch = next(it)
  shardings = {key: sharding for key in gp.TOKEN_KEYS}
  out = gp.to_global_arrays({**batch, "note": ["host-side"]}, shardings)
  assert out["note"] == ["host-side"]
  with pytest.raises(KeyError, match="inputs"):
    gp.to_global_arrays(batch, {})
  for key in gp.TOKEN_KEYS:
    arr = out[key]
    assert arr.shape == (8, 32) and arr.dtype == batch[key].dtype
    assert arr.sharding.is_equivalent_to(sharding, 2)
    np.testing.assert_array_equal(np.asarray(arr), batch[key])
    for shard in arr.addressable_shards:  # 4 batch slices of 2 rows, replicated over tensor
      assert shard.data.shape == (2, 32)
      np.testing.assert_array_equal(np.asarray(shard.data), batch[key][shard.index])


@pytest.mark.parametrize("pack", [False, True])
def test_route_gives_every_token_its_examples_adapter(records, tok, pack):
  """With a route, each token carries its example's adapter, through padding and packing."""
  factors = ("", "dose", "outcome", "dose+outcome")
  recs = [r.replace(perturbation=factors[i % 4], prompt=f"{i}. {r.prompt}")  # distinct inputs
          for i, r in enumerate(records)]
  adapter_of = {"": 0, "dose": 1, "outcome": 2, "dose+outcome": 0}
  by_inputs = {tuple(gp.sft_tokens(r, tok, 256)["inputs"]): adapter_of[r.perturbation]
               for r in recs}
  it = gp.make_sft_iterator(recs, tok, seq_len=256, global_batch_size=4, seed=0, num_epochs=1,
                            pack=pack, shard_index=0, shard_count=1, route=adapter_of.get)
  seen = set()
  for batch in it:
    ids_B = batch[gp.ADAPTER_KEY]
    assert ids_B.shape == ((4, 256) if pack else (4,)) and ids_B.dtype == np.int32
    if not pack:  # one example per row: one id per row
      ids_B = np.repeat(ids_B[:, None], 256, axis=1)
    for inputs, seg, ids in zip(batch["inputs"], batch["segment_ids"], ids_B):
      for s in np.unique(seg[seg > 0]):
        cols = seg == s
        want = by_inputs[tuple(inputs[cols])]
        assert np.all(ids[cols] == want)
        seen.add(want)
  assert seen == {0, 1, 2}
  prompts = next(gp.make_prompt_iterator(recs, tok, prompt_len=64, batch_size=8, seed=0,
                                         shard_index=0, shard_count=1, route=adapter_of.get))
  assert prompts[gp.ADAPTER_KEY].dtype == np.int32 and prompts[gp.ADAPTER_KEY].shape == (8,)
  assert set(prompts[gp.ADAPTER_KEY].tolist()) <= {0, 1, 2}
