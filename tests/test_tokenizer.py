"""Tokenizer: deterministic training, exact round trip, special ids."""
import pathlib
import pickle

import pytest

from data_pipeline import safe_pickle
from data_pipeline.build_report import BuildReport
from data_pipeline.readers.ctgov_xml import read_ctgov_xml
from deepimagine_jax.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def corpus(data_root):
  d = safe_pickle.load(data_root / "ct_open" / "Winter_2025.pickle")
  texts = []
  for v in d.values():
    texts.append(v["brief_title"])
    texts.append(str(v["endpoint"]))
  for t in read_ctgov_xml(data_root / "ctgov_xml", BuildReport()):  # enough text for 1000 pieces
    texts += [t.title] + [f"{o.title}. {o.description}" for o in t.outcomes]
  return texts


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
  return Tokenizer.train(corpus, tmp_path_factory.mktemp("tok"), vocab_size=1000)


def test_training_is_deterministic(corpus, tmp_path):
  a = Tokenizer.train(corpus, tmp_path / "a", vocab_size=800)
  # Reversed input order and a different directory still give the same bytes.
  b = Tokenizer.train(list(reversed(corpus)), tmp_path / "b", vocab_size=800)
  bytes_a = (tmp_path / "a" / "tokenizer.model").read_bytes()
  bytes_b = (tmp_path / "b" / "tokenizer.model").read_bytes()
  assert bytes_a == bytes_b
  for text in corpus[:50]:
    assert a.encode(text) == b.encode(text)


def test_special_ids_and_size(tok):
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert tok.vocab_size == 1000
  assert tok.id_to_piece(tok.bos_id) == "<s>"
  assert tok.id_to_piece(tok.eos_id) == "</s>"


@pytest.mark.parametrize("text", [
    "Line one  with two spaces\nDECISION: (1, 0)\n\n",
    "  leading and trailing  ",
    "unicode: é 中文 ≥ 5 mg/m² — IgA（x）",
    "DECISION: (0.2, 0.5, 0.3)",
    "",
])
def test_round_trip_is_exact(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_decision_is_one_token(tok):
  ids = tok.encode("x\nDECISION: (1, 0)")
  pieces = [tok.id_to_piece(i) for i in ids]
  assert "DECISION:" in pieces
  assert "\n" in pieces


def test_no_bos_eos_added(tok):
  ids = tok.encode("hello world")
  assert tok.bos_id not in ids and tok.eos_id not in ids


def test_load_file_dir_and_pickle(tok, tmp_path):
  loaded_file = Tokenizer.load(tok.path)
  loaded_dir = Tokenizer.load(pathlib.Path(tok.path).parent)
  text = "Change from baseline in urine protein"
  assert loaded_file.encode(text) == tok.encode(text) == loaded_dir.encode(text)
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode(text) == tok.encode(text)
  with pytest.raises(FileNotFoundError, match="no tokenizer model"):
    Tokenizer.load(tmp_path / "missing")


def test_too_large_vocab_shrinks(tmp_path):
  texts = ["alpha beta gamma", "delta epsilon", "DECISION: (1, 0)"]
  tok = Tokenizer.train(texts, tmp_path, vocab_size=5000)
  assert 260 < tok.vocab_size < 5000  # 256 bytes + 4 specials + symbols + merges
  assert tok.decode(tok.encode("alpha delta")) == "alpha delta"


def test_empty_corpus_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="empty"):
    Tokenizer.train(["", "  \n"], tmp_path, vocab_size=300)
