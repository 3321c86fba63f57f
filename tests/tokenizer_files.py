"""Checkpoint tokenizer folders built locally (no download), shaped like the real ones.

Qwen3 (byte-level BPE, ChatML, no BOS), Llama-3 (byte-level BPE, BOS from the
post-processor, header tokens, no pad), Llama-2 (SentencePiece with a dummy prefix,
[INST] turns ending in </s>) and Gemma (SentencePiece with Gemma's
special ids pad 0, eos 1, bos 2, unk 3, mask 4 and <start_of_turn>/<end_of_turn>). The
chat templates follow the published ones' structure.
"""
import io
import json
import pathlib

import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from data_pipeline import questions, templates
from data_pipeline.build_report import BuildReport
from data_pipeline.readers import ct_open, ctgov_xml

QWEN_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
              r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")
GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


def ct_open_examples(data_root, n: int):
  """The first n rendered benchmark-style prompts: the CT Open-format questions (Winter then
  Summer 2025), then the registry sample's derived questions (CT Open's wording)."""
  exs = []
  for name in ("Winter_2025", "Summer_2025"):
    exs += ct_open.read_questions(data_root / "ct_open" / f"{name}.pickle", BuildReport(),
                                  split=name)
  if len(exs) < n:  # the full data's registry is large: read it only when needed
    exs += questions.derive_all(ctgov_xml.read_ctgov_xml(data_root / "ctgov_xml", BuildReport()))
  return [templates.render(e) for e in exs[:n]]


def _added(content: str) -> dict:
  return {"content": content, "lstrip": False, "rstrip": False, "normalized": False,
          "single_word": False, "special": True}


def _write_json(path: pathlib.Path, obj):
  path.write_text(json.dumps(obj, indent=1, ensure_ascii=False))


def byte_level_bpe(out: pathlib.Path, texts, style: str, vocab_size: int = 1000,
                   template: bool = True) -> pathlib.Path:
  """A Qwen3- or Llama-3-shaped tokenizer.json + tokenizer_config.json + generation_config.json."""
  out.mkdir(parents=True, exist_ok=True)
  if style == "qwen":
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    regex, chat = QWEN_REGEX, QWEN_TEMPLATE
  else:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    regex, chat = LLAMA3_REGEX, LLAMA3_TEMPLATE
  tok = tokenizers.Tokenizer(models.BPE())
  if style == "qwen":
    tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(sorted(texts), trainers.BpeTrainer(
      vocab_size=vocab_size, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.add_special_tokens(specials)
  ids = {s: tok.token_to_id(s) for s in specials}
  if style == "qwen":
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None,
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "unk_token": None, "clean_up_tokenization_spaces": False,
              "errors": "replace", "split_special_tokens": False}
    generation = {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                  "pad_token_id": ids["<|endoftext|>"]}
  else:
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, ids[bos])])])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
              "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": False}
    generation = {"bos_token_id": ids[bos],
                  "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]}
  config["added_tokens_decoder"] = {str(i): _added(s) for s, i in ids.items()}
  if template:
    config["chat_template"] = chat
  tok.save(str(out / "tokenizer.json"))
  _write_json(out / "tokenizer_config.json", config)
  _write_json(out / "generation_config.json", generation)
  return out


def _train_bpe(texts, vocab_size: int, **ids) -> io.BytesIO:
  """A byte-fallback SentencePiece BPE over the texts' lines, with the given special ids."""
  proto = io.BytesIO()
  lines = sorted(line for t in texts for line in t.split("\n") if line.strip())
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=proto, vocab_size=vocab_size,
      model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
      remove_extra_whitespaces=False, split_digits=True, character_coverage=1.0,
      num_threads=1, minloglevel=2, **ids)
  return proto


def gemma_sentencepiece(out: pathlib.Path, texts, vocab_size: int = 1000,
                        template: bool = True) -> pathlib.Path:
  """A Gemma-shaped tokenizer.model (pad 0, eos 1, bos 2, unk 3, mask 4) + its configs."""
  out.mkdir(parents=True, exist_ok=True)
  proto = _train_bpe(texts, vocab_size, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                     pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
                     user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>", "\n"],
                     add_dummy_prefix=False)
  (out / "tokenizer.model").write_bytes(proto.getvalue())
  sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
  names = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
  config = {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
            "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>",
            "add_bos_token": True,
            "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {str(sp.piece_to_id(s)): _added(s)
                                     for s in names}}
  if template:
    config["chat_template"] = GEMMA_TEMPLATE
  _write_json(out / "tokenizer_config.json", config)
  _write_json(out / "generation_config.json",
              {"bos_token_id": 2, "eos_token_id": [1, sp.piece_to_id("<end_of_turn>")],
               "pad_token_id": 0})
  return out


def llama2_sentencepiece(out: pathlib.Path, texts, vocab_size: int = 1000,
                         template: bool = True) -> pathlib.Path:
  """A Llama-2-shaped tokenizer.model (unk 0, bos 1, eos 2, no pad, dummy prefix, non-legacy)."""
  out.mkdir(parents=True, exist_ok=True)
  proto = _train_bpe(texts, vocab_size, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
  (out / "tokenizer.model").write_bytes(proto.getvalue())
  config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "pad_token": None, "add_bos_token": True,
            "add_eos_token": False, "legacy": False, "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {str(i): _added(s)
                                     for i, s in enumerate(["<unk>", "<s>", "</s>"])}}
  if template:
    config["chat_template"] = LLAMA2_TEMPLATE
  _write_json(out / "tokenizer_config.json", config)
  _write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
  return out
