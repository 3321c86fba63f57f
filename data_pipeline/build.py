"""The dataset build: raw records -> questions and counterfactual pairs -> splits ->
rendered JSONL + tokenizer + report.

    python launch/main.py --config=configs/data.py   (calls build_dataset)

The build directory holds `examples/<split>.jsonl`, `tokenizer/tokenizer.model`,
`report.json`, `fingerprint.json` (and `tfds/` when asked). Everything is written
into a staging folder beside it and swapped in with renames, so a crash never
leaves a half-written build that looks complete, and the previous build survives.
A build whose fingerprint (the config keys that change the output, the data
files' names/sizes/mtimes and BUILD_VERSION) matches is loaded, not rebuilt.

Registry trials (ctgov_xml, ctgov_json files and API v2 bulk zips) pass the paper's
filter (data.registry_*: randomised, enrollment, results posted; drops counted under
`trial_filter`). CT Open's Train_2025 parts, when present, are read as one release.

CT Open Summer 2025 trials are the benchmark `eval` split (their questions keep the
CT Open keys the evaluation needs); every other trial is hashed into
train / dev / rl. Winter 2025 questions about a Summer trial are dropped (counted):
they are not benchmark questions and would leak the trial into training.

Every question with a public date gets up to `anchors_k` anchors (anchors.find_anchors:
training trials only, public before its cutoff) and, with each, an approximate pair
(and a chain when the walk has two or more steps); the retrieval index is saved in
`index/` with its sha256 in the report. Natural (same-trial) pairs are for training
only. Once the tokenizer is trained, every prompt over `prompt_len` tokens (or too
long for `seq_len` with its completion) is re-rendered with its longest fields cut
(templates.fit_to_tokens), so nothing downstream cuts a prompt; the report counts
the prompts with cut fields per split.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from typing import Callable, Iterable, Protocol, Sequence

from data_pipeline import (anchors, build_stream, facts, io, questions, retrieval, splits,
                           synthetic, templates)
from data_pipeline.build_report import (BuildReport, ExampleCounts, format_report,
                                        label_balance)  # noqa: F401 (build.label_balance)
from data_pipeline.config import DataConfig
from data_pipeline.data_root import CT_OPEN_TRAIN_FILES, resolve_data_root
from data_pipeline.example import Example
from data_pipeline.readers import ct_open, ctgov_bulk, ctgov_json, ctgov_xml, evidence_inference
from data_pipeline.schema import Trial

BUILD_VERSION = 5  # bump when the build's code changes what it writes
SPLITS = ("train", "dev", "rl", "eval")
REGISTRY_SOURCES = ("ctgov_xml", "ctgov_json")
CT_OPEN_RELEASES = ("Train_2025", "Winter_2025", "Summer_2025")  # Train: three files, merged
EVAL_RELEASE = "Summer_2025"
# The config keys that change what a build writes (pack does not; seq_len and
# prompt_len size the prompts).
FINGERPRINT_KEYS = ("sources", "seed", "vocab_size", "dev_fraction", "rl_fraction",
                    "max_anchors", "anchors_k", "retriever", "factor_order", "seq_len",
                    "prompt_len", "tfds", "registry_randomised", "registry_min_enrollment",
                    "registry_results_posted", "registry_eval_fraction")
TRIAL_FILTER = "trial_filter"  # the report's counts of registry trials the filter drops
SYNTHETIC_EXAMPLES = 2000


class TrainedTokenizer(Protocol):
  vocab_size: int

  def encode(self, text: str) -> list[int]:
    """Token ids, no BOS / EOS."""


# train_tokenizer(texts, model_dir, vocab_size) writes model_dir/tokenizer.model and
# returns the trained tokenizer (deepimagine_jax.tokenizer.Tokenizer.train is one).
TrainTokenizer = Callable[[Iterable[str], pathlib.Path, int], TrainedTokenizer]


@dataclasses.dataclass
class BuiltData:
  """A finished build on disk."""
  dir: pathlib.Path
  tokenizer_path: pathlib.Path
  report: dict
  splits: tuple[str, ...]

  def examples(self, split: str, kinds: Sequence[str] | None = None) -> list[Example]:
    """The examples of `split` (e.g. 'train'), optionally only those of the given kinds."""
    if split not in self.splits:
      raise KeyError(f"{self.dir}: no split {split!r}; splits are {list(self.splits)}")
    keep = set(kinds) if kinds is not None else None
    exs = (Example.from_json(r) for r in io.read_jsonl(self.dir / "examples" / f"{split}.jsonl"))
    return [ex for ex in exs if keep is None or ex.kind in keep]


# --- fingerprint --------------------------------------------------------------

def ct_open_files(root: pathlib.Path, release: str) -> list[pathlib.Path]:
  names = CT_OPEN_TRAIN_FILES if release == "Train_2025" else (f"{release}.pickle",)
  return [root / "ct_open" / n for n in names]


def source_files(root: pathlib.Path, sources: Sequence[str]) -> list[pathlib.Path]:
  """The input files a build reads, in a fixed order."""
  files = []
  if "ct_open" in sources:
    files += [p for r in CT_OPEN_RELEASES for p in ct_open_files(root, r)]
  if "ctgov_xml" in sources:
    files += sorted((root / "ctgov_xml").glob("*.xml"))
  if "ctgov_json" in sources:
    files += sorted((root / "ctgov_json").glob("*.json"))
    files += sorted((root / "ctgov_json").glob("*.zip"))  # API v2 bulk archives
  if "evidence_inference" in sources:
    files += sorted((root / "evidence_inference").glob("*.csv"))
    files += sorted((root / "evidence_inference").glob("ev2_*_article_ids.txt"))
  return files


def fingerprint(cfg: DataConfig, root: pathlib.Path, embed: retrieval.Embed | None = None
                ) -> dict:
  """What decides a build's content; equal fingerprints mean an equal build. A dense
  build names its embed function by repr (an object address: never reused by mistake)."""
  sources = cfg.sources
  files = []
  for p in source_files(root, sources):
    st = p.stat() if p.exists() else None
    files.append([os.fspath(p.relative_to(root)), st.st_size if st else -1,
                  st.st_mtime_ns if st else -1])
  keys = {k: getattr(cfg, k) for k in FINGERPRINT_KEYS}
  keys["sources"] = list(sources)
  keys["factor_order"] = list(cfg.factor_order)
  if cfg.retriever == "dense":
    keys["embed"] = repr(embed)
  body = {"build_version": BUILD_VERSION, "config": keys, "root": os.fspath(root),
          "synthetic_examples": SYNTHETIC_EXAMPLES if "synthetic" in sources else 0,
          "files": files}
  digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
  return {"sha256": digest, **body}


def _load_if_current(build_dir: pathlib.Path, fp: dict) -> BuiltData | None:
  try:
    old = json.loads((build_dir / "fingerprint.json").read_text())
    report = json.loads((build_dir / "report.json").read_text())
  except (OSError, ValueError):
    return None
  names = tuple(report.get("split_sizes", {}))
  tok = build_dir / "tokenizer" / "tokenizer.model"
  if old.get("sha256") != fp["sha256"] or not tok.is_file() or not all(
      (build_dir / "examples" / f"{s}.jsonl").is_file() for s in names):
    return None
  return BuiltData(build_dir, tok, report, names)


# --- reading ------------------------------------------------------------------

def filter_registry(trials: Sequence[Trial], cfg: DataConfig, report: BuildReport
                    ) -> list[Trial]:
  """One Trial per id (the last read replaces an earlier one: JSON over XML) that passes
  the paper's filter (randomised, enrollment, results posted); each drop is counted
  under TRIAL_FILTER by its first failing reason."""
  by_id: dict[str, Trial] = {}
  for t in trials:
    if t.id in by_id:
      report.add_skip(TRIAL_FILTER, "duplicate_trial", t.id)
    by_id[t.id] = t
  kept = []
  for t in by_id.values():
    reason = ("allocation_unknown" if cfg.registry_randomised and not t.allocation else
              "not_randomised" if cfg.registry_randomised and t.allocation != "RANDOMIZED" else
              "enrollment_unknown" if cfg.registry_min_enrollment and t.enrollment is None else
              "enrollment_below_min" if (t.enrollment or 0) < cfg.registry_min_enrollment else
              "no_results_posted" if cfg.registry_results_posted and not t.results_posted
              else "")
    if reason:
      report.add_skip(TRIAL_FILTER, reason, t.id)
    else:
      kept.append(t)
  return kept


def read_sources(root: pathlib.Path, cfg: DataConfig, report: BuildReport):
  """(question Examples, {trial id: Trial}, ready Examples such as synthetic)."""
  qs, trials, ready = [], {}, []
  sources = cfg.sources
  if "ct_open" in sources:
    for rel in CT_OPEN_RELEASES:
      paths = ct_open_files(root, rel)
      for path in paths:
        if not path.is_file():
          report.add_skip("ct_open", "missing_file", os.fspath(path))
      paths = [p for p in paths if p.is_file()]
      if not paths:
        continue
      qs += ct_open.read_questions(paths, report, split=rel)
      for t in ct_open.read_trials(paths, report):
        trials.setdefault(t.id, t)
  registry = []
  if "ctgov_xml" in sources:
    registry += ctgov_xml.read_ctgov_xml(root / "ctgov_xml", report)
  if "ctgov_json" in sources:
    registry += ctgov_json.read_ctgov_json(root / "ctgov_json", report)
    registry += ctgov_bulk.read_ctgov_zip(root / "ctgov_json", report)
  registry = filter_registry(registry, cfg, report)
  for t in registry:
    trials[t.id] = t  # registry records carry countries, phase, eligibility: prefer them
  qs += questions.derive_all(registry, report)
  if "evidence_inference" in sources:
    rows = evidence_inference.read_evidence_inference(root / "evidence_inference", report)
    qs += [evidence_inference.question(r) for r in rows]
  if "synthetic" in sources:
    ready += synthetic.make_synthetic(SYNTHETIC_EXAMPLES, cfg.seed)
    report.add_read("synthetic", SYNTHETIC_EXAMPLES)
  return qs, trials, ready


# --- statistics ---------------------------------------------------------------

def fit_record(rec: dict, n_tokens: Callable[[str], int], cfg: DataConfig) -> Example | None:
  """The record's example re-rendered to fit prompt_len tokens with BOS (and seq_len with its
  completion, BOS and EOS), so no consumer cuts one; None when it already fits (the record
  is written as it is). templates.PromptTooLong when it cannot fit."""
  limit = min(cfg.prompt_len - 1, cfg.seq_len - 2 - n_tokens(rec["completion"]))
  if n_tokens(rec["prompt"]) <= limit:  # templates.fit_to_tokens would return it unchanged
    return None
  return templates.fit_to_tokens(Example.from_json(rec), n_tokens, limit)


def fit_prompts(src: build_stream.Written, dest: pathlib.Path, tok: TrainedTokenizer,
                cfg: DataConfig, report: BuildReport, counts: ExampleCounts) -> dict:
  """Every split's examples in `src` rewritten to `dest` with their prompts fitted (fit_record),
  one line at a time; each record kept is added to `counts`. Returns {split: {examples,
  shortened (a field cut), refit (re-rendered for tokens), max_tokens, max_chars}}; a
  prompt that cannot fit is dropped, counted under 'render'."""
  n_tokens = functools.lru_cache(maxsize=1 << 16)(lambda text: len(tok.encode(text)))
  out = {}
  for s in counts.splits:
    kept = refit = longest = shortened = max_chars = 0
    with io.JsonlWriter(dest / f"{s}.jsonl") as w:
      for line in src.lines(s):
        rec = json.loads(line)
        try:
          fitted = fit_record(rec, n_tokens, cfg)
        except templates.PromptTooLong as e:
          report.add_skip("render", "prompt_too_long", f"{rec['id']}: {str(e)[:80]}")
          continue
        if fitted is None:
          w.write_line(line)
          prompt, cut = rec["prompt"], rec["prompt_fields_cut"]
        else:
          w.write_line(build_stream.example_line(fitted))
          prompt, cut = fitted.prompt, fitted.prompt_fields_cut
          refit += 1
        kept += 1
        shortened += cut > 0
        longest = max(longest, 1 + n_tokens(prompt))
        max_chars = max(max_chars, len(prompt))
        counts.add(s, rec)  # fitting changes only prompt, completion and prompt_fields_cut
    out[s] = {"examples": kept, "shortened": shortened, "refit": refit, "max_tokens": longest,
              "max_chars": max_chars}
  return out


def _eval_source_of(sources: set[str]) -> str:
  if not sources:
    return "none"
  if sources == {"ct_open"}:
    return f"CT Open {EVAL_RELEASE.replace('_', ' ')}"
  return (f"Registry-derived questions (not CT Open; {', '.join(sorted(sources))} trials "
          f"whose results were posted last)")


def eval_source(eval_examples: Sequence[Example]) -> str:
  """What the eval split's questions are, as the report and the eval table name them."""
  return _eval_source_of({ex.source for ex in eval_examples if ex.kind == "question"})


def make_report(reader: BuildReport, counts: ExampleCounts, eval_trials: int, elapsed: float,
                tok_vocab: int, fp: dict, found: anchors.AnchorSet, index: dict | None,
                prompts: dict) -> dict:
  rd = reader.to_dict()
  return {
      "build_version": BUILD_VERSION,
      "fingerprint": fp["sha256"],
      "elapsed_s": round(elapsed, 1),
      "records": {s: d for s, d in rd.items()
                  if ":" not in s and s not in ("splits", "render", TRIAL_FILTER)},
      "questions_skipped": {s.split(":", 1)[1]: d["skipped"] for s, d in rd.items()
                            if s.startswith("questions:")},
      "dropped": {s: d["skipped"] for s, d in rd.items()
                  if s in ("splits", "render", TRIAL_FILTER)},
      **counts.to_dict(),
      "anchors": {"k": fp["config"]["anchors_k"], "retriever": fp["config"]["retriever"],
                  "factor_order": fp["config"]["factor_order"],
                  "coverage": found.coverage, "index": index},
      "prompts": prompts,
      "eval_trials": eval_trials,
      "eval_source": _eval_source_of(counts.eval_question_sources),
      "tokenizer_vocab_size": tok_vocab,
      "reused": False,  # True when build_dataset returns an existing build
  }


# --- the build ----------------------------------------------------------------

def registry_eval(qs: Sequence[Example], trials: dict, fraction: float, report: BuildReport
                  ) -> tuple[list[Example], set[str]]:
  """Without CT Open's held-out release: the registry trials whose results were posted
  last (`fraction` of those with benchmark-type questions) become the eval split, and
  every registry question of a benchmark type gets CT Open's key and category
  (questions.benchmark_form) so the eval scores them, and the baselines train on the
  rest, with the benchmark's code. Labelled in the report (`eval_source`); the neutral
  questions of eval trials are dropped (counted)."""
  registry = [q for q in qs if q.source in REGISTRY_SOURCES]  # ctgov_xml / _json / bulk
  keyed = {q.id: q for q in questions.benchmark_form(registry)}
  dated = sorted({q.trial_id for q in keyed.values()},
                 key=lambda t: (trials[t].results_posted, t))
  eval_ids = set(dated[len(dated) - round(fraction * len(dated)):]) if dated else set()
  out = []
  for q in qs:
    if q.source not in REGISTRY_SOURCES:
      out.append(q)
    elif q.id in keyed:
      out.append(keyed[q.id])
    elif q.trial_id in eval_ids:
      report.add_skip("splits", "registry_eval_not_benchmark_type", q.id)
    else:
      out.append(q)
  logging.info("data build: no CT Open %s release; eval = %d registry trials posted last",
               EVAL_RELEASE, len(eval_ids))
  return out, eval_ids


def prepare(cfg: DataConfig, root: pathlib.Path, report: BuildReport,
            embed: retrieval.Embed | None = None) -> build_stream.Pairing:
  """Read the sources, choose the eval trials, attach facts and dates, retrieve anchors."""
  qs, trials, ready = read_sources(root, cfg, report)
  eval_ids = splits.ct_open_eval_ids(qs, EVAL_RELEASE)
  if not eval_ids and cfg.registry_eval_fraction > 0:
    qs, eval_ids = registry_eval(qs, trials, cfg.registry_eval_fraction, report)
  kept = []
  for q in qs:  # a Winter question about a Summer trial is neither benchmark nor trainable
    if q.source == "ct_open" and q.trial_id in eval_ids and q.split != EVAL_RELEASE:
      report.add_skip("splits", "ct_open_earlier_release_on_eval_trial", q.id)
    else:
      kept.append(q)
  qs = facts.attach_facts(anchors.with_public_dates(kept, trials), trials)
  split_of = splits.TrialSplits(cfg.seed, dev_fraction=cfg.dev_fraction,
                                rl_fraction=cfg.rl_fraction, eval_trial_ids=eval_ids)
  found = anchors.find_anchors(qs, trials, split_of, k=cfg.anchors_k, retriever=cfg.retriever,
                               embed=embed)
  return build_stream.Pairing(qs, ready, found, eval_ids, split_of)


def split_names(seen: Iterable[str]) -> tuple[str, ...]:
  """SPLITS, then any other split seen, sorted."""
  return SPLITS + tuple(sorted(set(seen) - set(SPLITS)))


def make_examples(cfg: DataConfig, root: pathlib.Path, report: BuildReport,
                  embed: retrieval.Embed | None = None
                  ) -> tuple[dict[str, list[Example]], anchors.AnchorSet, set[str]]:
  """Read, pair, render and split, held in memory: ({split: examples}, the anchors, the
  eval trial ids). The same stages as build_dataset, which streams them to files.

  Checked: no held-out trial leaks into training (splits.LeakageCheck) and every
  cross-trial anchor is time-respecting.
  """
  p = prepare(cfg, root, report, embed)
  by_split: dict[str, list[Example]] = collections.defaultdict(list)
  made = build_stream.iter_examples(p, cfg.factor_order, cfg.max_anchors, report)
  for split, ex in build_stream.split_checked(made, p.split_of, report):
    by_split[split].append(ex.replace(split=split))
  return {s: by_split.get(s, []) for s in split_names(by_split)}, p.found, p.eval_ids


def build_dataset(cfg: DataConfig, workdir: str | os.PathLike, *,
                  train_tokenizer: TrainTokenizer, embed: retrieval.Embed | None = None,
                  force: bool = False, verbose: bool = True) -> BuiltData:
  """Builds (or reuses) the dataset described by `cfg`.

  `train_tokenizer(texts, model_dir, vocab_size)` trains the build's tokenizer on
  the prompts and completions of every split but eval, writing
  `model_dir/tokenizer.model`, and returns it (its `vocab_size` goes in the report,
  its `encode` sizes the prompts): pass `deepimagine_jax.tokenizer.Tokenizer.train`.
  `embed(texts) -> [N, D]` is the dense retriever's encoder (data.retriever 'dense').

  Examples are streamed, never all held (build_stream.write_examples, in worker
  processes): each is written to its split's file in the staging folder as it is made;
  the leakage and time-rule checks run on every one and fail the build before anything
  is swapped in. The tokenizer trains on those files, then each split is rewritten with
  its prompts fitted to the tokens and counted for the report.
  """
  t0 = time.time()
  root = resolve_data_root(cfg.root)
  build_dir = pathlib.Path(cfg.build_dir or pathlib.Path(workdir) / "data").resolve()
  fp = fingerprint(cfg, root, embed)
  for line in io.recover_swap(build_dir):
    logging.warning("data build: %s", line)
  if not force:
    built = _load_if_current(build_dir, fp)
    if built is not None:
      built.report["reused"] = True
      logging.info("data build: reusing %s (fingerprint %s)", build_dir, fp["sha256"][:12])
      if verbose:
        print(f"data build: reusing {build_dir} (fingerprint matches)")
      return built
  logging.info("data build: building %s from %s (sources %s)", build_dir, root, cfg.sources)

  report = BuildReport()
  p = prepare(cfg, root, report, embed)

  build_dir.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=io.staging_prefix(build_dir),
                                          dir=build_dir.parent))
  try:
    os.chmod(staging, 0o755)  # mkdtemp's 0700 would become the build's mode
    written = build_stream.write_examples(p, cfg.factor_order, cfg.max_anchors, report,
                                          staging / "unfitted")
    names = split_names(written.sizes)
    tok = train_tokenizer(written.texts([s for s in names if s != "eval"]),
                          staging / "tokenizer", cfg.vocab_size)
    counts = ExampleCounts(names)
    prompts = fit_prompts(written, staging / "examples", tok, cfg, report, counts)
    shutil.rmtree(staging / "unfitted")
    index = (retrieval.save_index(staging / "index", p.found.retriever, p.found.pool_dates)
             if p.found.retriever is not None else None)
    if cfg.tfds:
      from data_pipeline.tfds_pairs import build_tfds  # heavy import, only when asked
      both = staging / "all.jsonl"
      with io.JsonlWriter(both) as w:
        for s in names:
          for line in build_stream.read_lines(staging / "examples" / f"{s}.jsonl"):
            w.write_line(line)
      build_tfds(both, staging / "tfds")
      both.unlink()
    rep = make_report(report, counts, len(p.eval_ids), time.time() - t0, tok.vocab_size, fp,
                      p.found, index, prompts)
    io.write_json(staging / "report.json", rep, sort_keys=True)
    # written last: a staging folder without it is never mistaken for a build
    io.write_json(staging / "fingerprint.json", fp)
    io.swap_in(staging, build_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  if verbose:
    print(format_report(rep))
  logging.info("data build: wrote %s in %.1f s", build_dir, rep["elapsed_s"])
  return BuiltData(build_dir, build_dir / "tokenizer" / "tokenizer.model", rep, names)
