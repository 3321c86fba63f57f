"""Tokenizers: the project's own SentencePiece model, or the one a checkpoint ships.

One `Tokenizer`, two back-ends chosen by what the folder holds: `tokenizer.json`
through Hugging Face's `tokenizers` (byte-level BPE: Qwen3, Llama-3; preferred
when both files are there, as transformers does) or a SentencePiece
`tokenizer.model` (Gemma, Llama-2, and the project's own). Special ids come from
the files - `tokenizer_config.json`, `generation_config.json`, the SentencePiece
proto - never from constants. An instruct model's chat template (from
`chat_template.jinja`, else `tokenizer_config.json`) is rendered with jinja2 in
the environment transformers uses, so prompts reach the model the way it was
trained to read them; a tokenizer without one (the project's own) gives
`[BOS] prompt` as before.

`eos_id` is the id a completion ends with: the chat template's end of turn
(Gemma `<end_of_turn>`, Qwen `<|im_end|>`, Llama-3 `<|eot_id|>`), else the EOS
token. `stop_ids` adds every id that should also stop sampling
(`generation_config.json` eos ids and the EOS token).

Training (`Tokenizer.train`, the data build's) is deterministic: lines are fed in
sorted order through an iterator (a file path would be recorded inside the model
proto), one thread, no sampling of the input. Normalisation is the identity and
whitespace is kept, so `decode(encode(text)) == text` for any text (byte fallback
covers characters the vocabulary lacks) - the sampler's output must round-trip to
the exact `DECISION:` line the reward parser reads.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import pathlib
import re
from io import BytesIO
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2

from data_pipeline import io

MODEL_NAME = "tokenizer.model"
JSON_NAME = "tokenizer.json"
CONFIG_NAME = "tokenizer_config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
TEMPLATE_NAME = "chat_template.jinja"
SPECIAL_MAP_NAME = "special_tokens_map.json"
# Everything a tokenizer is read from; an exported policy carries the same files.
FILES = (JSON_NAME, MODEL_NAME, CONFIG_NAME, SPECIAL_MAP_NAME, TEMPLATE_NAME,
         GENERATION_CONFIG_NAME)
# The named special tokens transformers hands a chat template (its special_tokens_map).
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                 "mask_token")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3  # the project's own trained model
# "DECISION:" keeps the answer line a single stable token; "\n" gives newlines
# their own piece (SentencePiece trains line by line and would otherwise never
# see one, leaving it to byte fallback).
DEFAULT_SYMBOLS = ("DECISION:", "\n")
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_SENTINEL = "PROMPTSENTINEL7f3a"  # stands for the prompt while finding the template's frame


class Tokenizer:
  """Token ids for one model: encode/decode, special ids, prompt and completion ids."""

  def __init__(self, files: Mapping[str, bytes], path: str = "<bytes>"):
    self._files = {k: bytes(v) for k, v in files.items()}
    self.path = path
    config = _json_file(self._files, CONFIG_NAME, path)
    if "added_tokens_decoder" not in config:  # a legacy folder: transformers reads this file too
      config.update(_json_file(self._files, SPECIAL_MAP_NAME, path))
    generation = _json_file(self._files, GENERATION_CONFIG_NAME, path)
    if JSON_NAME in self._files:
      self._backend = _HFTokenizers(self._files[JSON_NAME])
    elif MODEL_NAME in self._files:
      self._backend = _SentencePiece(self._files[MODEL_NAME], config, path)
    else:
      raise FileNotFoundError(f"{path}: no {JSON_NAME} or {MODEL_NAME}")
    # Named special tokens: tokenizer_config.json's (null = none), else the proto's.
    self._special_tokens = {}
    for name in SPECIAL_NAMES:
      token = _content(config[name]) if name in config else self._backend.proto_token(name)
      if token is not None:
        self._special_tokens[name] = token
    ids = {name: self._token_id(token, f"{CONFIG_NAME} {name}")
           for name, token in self._special_tokens.items()}
    self.bos_id = ids.get("bos_token")
    self.unk_id = ids.get("unk_token")
    self._eos_token_id = ids.get("eos_token")
    self.pad_id = ids["pad_token"] if "pad_token" in ids else generation.get("pad_token_id")
    if self.pad_id is None:  # Llama-3 has none: padding is masked, so any real id serves
      self.pad_id = self._eos_token_id
    self.chat_template = _chat_template(self._files, config, path)
    if self.chat_template is not None:
      self._template = _compile(self.chat_template)
      self._head, self.eos_id = self._template_frame()
    else:
      self._template = None
      self._head = self._backend.leading_ids(self.bos_id, config)
      self.eos_id = self._eos_token_id
    if self.eos_id is None or self.pad_id is None:
      raise ValueError(f"{path}: no EOS token (set eos_token in {CONFIG_NAME})")
    gen_eos = generation.get("eos_token_id", [])
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
    self.stop_ids = tuple(dict.fromkeys(
        [self.eos_id, *gen_eos] + ([] if self._eos_token_id is None else [self._eos_token_id])))

  # Grain may pickle map functions into worker processes; the C++ tokenizers do
  # not pickle, so carry the file bytes and rebuild.
  def __getstate__(self):
    return {"files": self._files, "path": self.path}

  def __setstate__(self, state):
    self.__init__(state["files"], state["path"])

  @classmethod
  def train(cls, texts: Iterable[str], model_dir: str | os.PathLike, vocab_size: int,
            model_type: str = "bpe",
            user_defined_symbols: Sequence[str] = DEFAULT_SYMBOLS) -> "Tokenizer":
    """Trains the project's own model on `texts`; writes `model_dir/tokenizer.model`.

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
    out = io.atomic_write(pathlib.Path(model_dir) / MODEL_NAME, proto)
    return cls({MODEL_NAME: proto}, str(out))

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Tokenizer":
    """Loads a folder's tokenizer files, or one tokenizer.json / .model file and its folder's configs."""
    p = pathlib.Path(path)
    folder = p if p.is_dir() else p.parent
    files = {name: (folder / name).read_bytes() for name in FILES if (folder / name).is_file()}
    if p.is_file():
      main = JSON_NAME if p.suffix == ".json" else MODEL_NAME
      for name in (JSON_NAME, MODEL_NAME):
        files.pop(name, None)
      files[main] = p.read_bytes()
    if JSON_NAME not in files and MODEL_NAME not in files:
      raise FileNotFoundError(f"no tokenizer model at {p} (looked for {JSON_NAME}, {MODEL_NAME})")
    return cls(files, str(p))

  def save(self, out_dir: str | os.PathLike):
    """Writes the files this tokenizer was read from, byte for byte, each atomically."""
    for name, data in self._files.items():
      io.atomic_write(pathlib.Path(out_dir) / name, data)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, no BOS/EOS added (special-token text is matched, as transformers does)."""
    return self._backend.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self._backend.decode([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self._backend.id_to_piece(int(i))

  @property
  def vocab_size(self) -> int:
    return self._backend.vocab_size

  def prompt_ids(self, prompt: str) -> tuple[list[int], list[int]]:
    """(head, body) of a prompt: truncation keeps head and drops body tokens from the left.

    Without a chat template head is `[BOS]` (when the model adds one) and body the
    prompt's ids. With one, the prompt is the user turn of the rendered chat with
    the generation prompt; head is the template's opening before the prompt text.
    """
    if self._template is None:
      return list(self._head), self.encode(prompt)
    ids = self.encode(self.render_chat(prompt))
    h = _common_prefix(ids, self._head)  # shorter only if a merge crosses into the prompt
    return ids[:h], ids[h:]

  def completion_ids(self, completion: str) -> list[int]:
    """The completion's ids ending in `eos_id` (the end of turn), as SFT trains and scoring reads them."""
    return self.encode(completion) + [self.eos_id]

  def render_chat(self, prompt: str, completion: str | None = None) -> str:
    """The chat template's text of a user turn: with the generation prompt, or with the answer."""
    messages = [{"role": "user", "content": prompt}]
    if completion is not None:
      messages.append({"role": "assistant", "content": completion})
    return self._template.render(messages=messages, tools=None, documents=None,
                                 add_generation_prompt=completion is None,
                                 **self._special_tokens)

  def _token_id(self, token: str, what: str) -> int:
    i = self._backend.token_id(token)
    if i is None:
      raise ValueError(f"{self.path}: {what} {token!r} is not in the vocabulary")
    return i

  def _template_frame(self) -> tuple[list[int], int]:
    """(ids before the prompt text, end-of-turn id), found by rendering a sentinel.

    The end of turn is the first special token after the assistant's answer in
    the rendered chat: it is what the model emits to end its turn.
    """
    text = self.render_chat(_SENTINEL)
    if text.count(_SENTINEL) != 1:
      raise ValueError(f"{self.path}: the chat template does not show the user's message once")
    before = text.split(_SENTINEL)[0]
    chat = self.render_chat("question", _SENTINEL)
    if chat.count(_SENTINEL) != 1:
      raise ValueError(f"{self.path}: the chat template does not show the assistant's answer once")
    specials = self._backend.special_ids()
    ends = [i for i in self.encode(chat.split(_SENTINEL)[1]) if i in specials]
    if not ends:
      raise ValueError(f"{self.path}: the chat template ends an assistant turn with no special "
                       "token, so there is no end-of-turn id to stop sampling at")
    return self.encode(before), ends[0]


class _HFTokenizers:
  """tokenizer.json through Hugging Face's `tokenizers` (its added tokens are matched in text)."""
  FILE = JSON_NAME

  def __init__(self, data: bytes):
    self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(i)

  def token_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def proto_token(self, name: str) -> None:
    return None  # tokenizer.json names no roles; tokenizer_config.json does

  def special_ids(self) -> set[int]:
    return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

  def leading_ids(self, bos_id, config) -> list[int]:
    """What the post-processor puts before the text (Llama-3: <|begin_of_text|>; Qwen: nothing).

    transformers ignores tokenizer_config.json's add_bos_token beside a tokenizer.json.
    """
    plain = self._tok.encode("a", add_special_tokens=False).ids
    full = self._tok.encode("a", add_special_tokens=True).ids
    for s in range(len(full) - len(plain) + 1):
      if full[s:s + len(plain)] == plain:
        return full[:s]
    raise ValueError(f"{JSON_NAME}: its post-processor rewrites the text's ids")

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)


class _SentencePiece:
  """A SentencePiece model; tokenizer_config.json's added tokens are split out of the text first."""
  FILE = MODEL_NAME
  _ROLES = {"bos_token": "bos_id", "eos_token": "eos_id", "unk_token": "unk_id",
            "pad_token": "pad_id"}

  def __init__(self, data: bytes, config: Mapping[str, Any], path: str):
    self._sp = spm.SentencePieceProcessor(model_proto=data)
    # transformers' non-legacy Llama tokenizer (`"legacy": false`) gives only the text's
    # first chunk the dummy prefix "▁", not the chunks after a special token.
    self._after_special = self._sp
    if not config.get("legacy", True):
      proto = sentencepiece_model_pb2.ModelProto()
      proto.ParseFromString(data)
      proto.normalizer_spec.add_dummy_prefix = False
      self._after_special = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    self._added, self._by_text = {}, {}  # id <-> text: matched in text and decoded as itself
    for i, token in config.get("added_tokens_decoder", {}).items():
      for flag in ("lstrip", "rstrip", "single_word"):
        if isinstance(token, dict) and token.get(flag):
          raise ValueError(f"{path}: {CONFIG_NAME} added token {token['content']!r} sets "
                           f"{flag}, which this SentencePiece back-end does not implement")
      self._added[int(i)] = _content(token)
    for name in SPECIAL_NAMES:
      token = _content(config.get(name))
      if token is not None and token not in self._added.values():
        i = self.token_id(token)
        if i is None:
          raise ValueError(f"{path}: {CONFIG_NAME} {name} {token!r} is not in {MODEL_NAME}")
        self._added[i] = token
    self._by_text = {t: i for i, t in self._added.items()}
    self._split = (re.compile("(" + "|".join(
        re.escape(t) for t in sorted(self._by_text, key=len, reverse=True)) + ")")
        if self._by_text else None)

  def encode(self, text: str) -> list[int]:
    if self._split is None:
      return self._sp.encode(text)
    ids = []
    for k, part in enumerate(self._split.split(text)):
      if k % 2:
        ids.append(self._by_text[part])
      elif part:
        ids += (self._sp if k == 0 else self._after_special).encode(part)
    return ids

  def decode(self, ids: list[int]) -> str:
    out, run = [], []
    for i in ids:
      if i in self._added:
        out += [self._sp.decode(run), self._added[i]]
        run = []
      else:
        run.append(i)
    return "".join(out) + self._sp.decode(run)

  def id_to_piece(self, i: int) -> str:
    return self._added[i] if i in self._added else self._sp.id_to_piece(i)

  def token_id(self, token: str) -> int | None:
    if token in self._by_text:
      return self._by_text[token]
    i = self._sp.piece_to_id(token)  # unknown pieces come back as the unk id
    return i if self._sp.id_to_piece(i) == token else None

  def proto_token(self, name: str) -> str | None:
    i = getattr(self._sp, self._ROLES[name])() if name in self._ROLES else -1
    return self._sp.id_to_piece(i) if i >= 0 else None

  def special_ids(self) -> set[int]:
    control = {i for i in range(self._sp.get_piece_size()) if self._sp.is_control(i)}
    return set(self._added) | control

  def leading_ids(self, bos_id, config) -> list[int]:
    """[BOS] unless tokenizer_config.json says add_bos_token: false (transformers' default is true)."""
    return [bos_id] if config.get("add_bos_token", True) and bos_id is not None else []

  @property
  def vocab_size(self) -> int:
    return max(self._sp.get_piece_size(), max(self._added, default=-1) + 1)


# Chat templates: the environment transformers renders them in -------------------

class _GenerationTag(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' masks; here it renders as is."""
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _compile(template: str) -> jinja2.Template:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template)


def _chat_template(files: Mapping[str, bytes], config: Mapping[str, Any], path: str) -> str | None:
  """chat_template.jinja, else tokenizer_config.json's chat_template (its "default" if named)."""
  if TEMPLATE_NAME in files:
    return files[TEMPLATE_NAME].decode("utf-8")
  template = config.get("chat_template")
  if isinstance(template, list):
    named = {t["name"]: t["template"] for t in template}
    if "default" not in named:
      raise ValueError(f"{path}: {CONFIG_NAME} chat_template has no 'default' among "
                       f"{sorted(named)}")
    template = named["default"]
  return template


def _json_file(files: Mapping[str, bytes], name: str, path: str) -> dict[str, Any]:
  if name not in files:
    return {}
  try:
    return json.loads(files[name].decode("utf-8"))
  except ValueError as e:
    raise ValueError(f"{path}: {name} is not valid JSON: {e}") from None


def _content(token) -> str | None:
  """A special token as tokenizer_config.json writes it: a string, an AddedToken dict, or null."""
  return token["content"] if isinstance(token, dict) else token


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def _train_proto(lines: list[str], vocab_size: int, model_type: str,
                 user_defined_symbols: Sequence[str]) -> bytes:
  out = BytesIO()
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
