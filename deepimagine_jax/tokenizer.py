"""SentencePiece tokenizer: deterministic training, loading, encode/decode.

The trained model is a pure function of the corpus and the settings: lines are
fed in sorted order through an iterator (a file path would be recorded inside the
model proto and differ between directories), one thread, no sampling of the
input. Normalisation is the identity and whitespace is kept, so
`decode(encode(text)) == text` for any text (byte fallback covers characters
the vocabulary lacks) - the sampler's output must round-trip to the exact
`DECISION:` line the reward parser reads.
"""
from __future__ import annotations

import io
import logging
import os
import pathlib
import re
from typing import Iterable, Sequence

import sentencepiece as spm

MODEL_NAME = "tokenizer.model"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# "DECISION:" keeps the answer line a single stable token; "\n" gives newlines
# their own piece (SentencePiece trains line by line and would otherwise never
# see one, leaving it to byte fallback).
DEFAULT_SYMBOLS = ("DECISION:", "\n")
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


class Tokenizer:
  """A loaded SentencePiece model with the project's special ids."""

  def __init__(self, model_proto: bytes, path: str = "<bytes>"):
    self._proto = bytes(model_proto)
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
    if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
      raise ValueError(f"{path}: special ids (pad, unk, bos, eos) are {ids}, "
                       f"expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}")

  # Grain may pickle map functions into worker processes; the C++ processor
  # itself does not pickle, so carry the model bytes and rebuild.
  def __getstate__(self):
    return {"model_proto": self._proto, "path": self.path}

  def __setstate__(self, state):
    self.__init__(state["model_proto"], state["path"])

  @classmethod
  def train(cls, texts: Iterable[str], model_dir: str | os.PathLike, vocab_size: int,
            model_type: str = "bpe",
            user_defined_symbols: Sequence[str] = DEFAULT_SYMBOLS) -> "Tokenizer":
    """Trains on `texts` and writes `model_dir/tokenizer.model`.

    If the corpus cannot support `vocab_size`, SentencePiece names the largest
    size it can reach; we retrain at that size and log the shrink rather than fail.
    """
    lines = sorted(line for t in texts for line in str(t).split("\n") if line.strip())
    if not lines:
      raise ValueError("Tokenizer.train: the corpus is empty")
    try:
      proto = _train_proto(lines, vocab_size, model_type, user_defined_symbols)
    except RuntimeError as e:
      m = _TOO_HIGH.search(str(e))
      if not m:
        raise
      reachable = int(m.group(2))
      logging.warning("Tokenizer.train: corpus of %d lines supports at most %d %s pieces; "
                      "requested %d, training with %d", len(lines), reachable,
                      model_type, vocab_size, reachable)
      proto = _train_proto(lines, reachable, model_type, user_defined_symbols)
    out = pathlib.Path(model_dir) / MODEL_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".model.tmp")
    tmp.write_bytes(proto)
    os.replace(tmp, out)  # never leave a half-written model under the final name
    return cls(proto, str(out))

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Tokenizer":
    """Loads `path` (a .model file, or a directory holding tokenizer.model)."""
    p = pathlib.Path(path)
    if p.is_dir():
      p = p / MODEL_NAME
    if not p.is_file():
      raise FileNotFoundError(f"no tokenizer model at {p}")
    return cls(p.read_bytes(), str(p))

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, no BOS/EOS added."""
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def model_proto(self) -> bytes:
    return self._proto

  pad_id = property(lambda self: PAD_ID)
  unk_id = property(lambda self: UNK_ID)
  bos_id = property(lambda self: BOS_ID)
  eos_id = property(lambda self: EOS_ID)


def _train_proto(lines: list[str], vocab_size: int, model_type: str,
                 user_defined_symbols: Sequence[str]) -> bytes:
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=out,
      vocab_size=vocab_size, model_type=model_type,
      byte_fallback=True, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      user_defined_symbols=list(user_defined_symbols),
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      split_digits=True, character_coverage=1.0,
      num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
      max_sentence_length=1 << 16, minloglevel=2)
  return out.getvalue()
