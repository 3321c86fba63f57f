"""The dataset build on a tiny root: files, tokenizer, report, reuse, leakage, bad input, crash;
and the real build's anchors on ../shared/data."""
import collections
import dataclasses
import json
import pickle
import shutil

import pytest

from configs import common
from data_pipeline import build, build_stream, safe_pickle, templates
from data_pipeline.config import DataConfig
from data_pipeline.example import Example
from deepimagine_jax.tokenizer import Tokenizer

XML_IDS = ("NCT00495469", "NCT00000392", "NCT00460564", "NCT00005044", "NCT00000620")
N_WINTER, N_SUMMER = 10, 6  # CT Open entries (trial, endpoint) copied per release
CT_OPEN_KEYS = ("nct_id", "endpoint_str", "category", "meta_label", "title", "endpoint",
                "outcome_title")


def _make_root(dest, data_root):
  """5 real XML files and small CT Open pickles written here (protocol 4, plain dicts)."""
  (dest / "ctgov_xml").mkdir(parents=True)
  for i in XML_IDS:
    shutil.copy(data_root / "ctgov_xml" / f"{i}.xml", dest / "ctgov_xml")
  (dest / "ct_open").mkdir()
  for rel, n in (("Winter_2025", N_WINTER), ("Summer_2025", N_SUMMER)):
    data = safe_pickle.load(data_root / "ct_open" / f"{rel}.pickle")
    small = dict(list(data.items())[:n])
    with open(dest / "ct_open" / f"{rel}.pickle", "wb") as f:
      pickle.dump(small, f, protocol=4)
  return dest


def _cfg(root, build_dir, **kw):
  c = common.data().to_dict()  # every data key, declared once in the config
  c.update(root=str(root), build_dir=str(build_dir), sources=("ct_open", "ctgov_xml", "synthetic"),
           vocab_size=400)
  c.update(kw)
  return DataConfig(**c)


def _build(cfg, **kw):
  return build.build_dataset(cfg, "unused", train_tokenizer=Tokenizer.train, verbose=False, **kw)


def _ex(options, label):
  return Example(id="e", source="test", kind="question", trial_id="T", options=options,
                 label=label)


@pytest.fixture(autouse=True)
def _few_synthetic(monkeypatch):
  monkeypatch.setattr(build, "SYNTHETIC_EXAMPLES", 200)


@pytest.fixture(scope="module")
def root(tmp_path_factory, data_root):
  return _make_root(tmp_path_factory.mktemp("root"), data_root)


@pytest.fixture(scope="module")
def built(root, tmp_path_factory):
  mp = pytest.MonkeyPatch()
  mp.setattr(build, "SYNTHETIC_EXAMPLES", 200)
  out = tmp_path_factory.mktemp("work") / "build"
  b = _build(_cfg(root, out))
  mp.undo()
  return b


def test_build_writes_splits_tokenizer_and_report(built):
  assert set(built.splits) == {"train", "dev", "rl", "eval"}
  for s in built.splits:
    assert (built.dir / "examples" / f"{s}.jsonl").is_file()
  r = json.loads((built.dir / "report.json").read_text())
  for key in ("records", "questions_by_source_and_type", "pairs_by_kind_and_perturbation",
              "split_sizes", "label_balance", "elapsed_s", "eval_trials"):
    assert key in r, key
  assert r["records"]["ctgov_xml"]["read"] == len(XML_IDS)
  assert r["records"]["synthetic"]["read"] == 200
  for s in built.splits:
    exs = built.examples(s)
    assert len(exs) == r["split_sizes"][s]
    for ex in exs:
      head = "ESTIMATE: (" if ex.kind == "arm_estimate" else "DECISION: ("
      assert ex.split == s and ex.prompt and ex.completion.startswith(head)
      assert 0 <= ex.label < len(ex.options)
  # The per-arm operators' examples train only: never in a held-out split
  train_kinds = {ex.kind for ex in built.examples("train")}
  assert {"arm_estimate", "arm_compare"} <= train_kinds
  assert not {ex.kind for s in ("dev", "eval") for ex in built.examples(s)} & {
      "arm_estimate", "arm_compare"}
  for ex in built.examples("train", ("arm_compare",)):  # the question's values, in its prompt
    state = templates.estimate_state(ex, ex.value_a, ex.value_b)
    assert state.lines(lambda key, text: text, "Result")[0] in ex.prompt
  tok = Tokenizer.load(built.tokenizer_path)
  text = built.examples("train")[0].prompt
  assert tok.decode(tok.encode(text)) == text and tok.vocab_size <= 400
  # dose groups of NCT00495469 give dose natural pairs
  assert r["pairs_by_kind_and_perturbation"]["natural_pair"].get("dose", 0) > 0


def test_label_balance_matches_counts(built):
  r = built.report
  for s in built.splits:
    exs = built.examples(s)
    for n, bal in r["label_balance"][s].items():
      sub = [ex for ex in exs if len(ex.options) == int(n)]
      assert bal["n"] == len(sub)
      for i, frac in enumerate(bal["fractions"]):
        assert frac == pytest.approx(sum(ex.label == i for ex in sub) / len(sub), abs=1e-4)
  assert build.label_balance([_ex(("a", "b"), 1)] * 3 + [_ex(("a", "b"), 0)]) == {
      "2": {"n": 4, "fractions": [0.25, 0.75]}}


def test_eval_is_ct_open_summer_with_its_keys_and_no_leakage(built, root):
  summer = safe_pickle.load(root / "ct_open" / "Summer_2025.pickle")
  eval_trials = {k[0] for k in summer}
  n_summer_q = sum(len(v["question_list_of_lists"]) for v in summer.values())
  eval_q = [ex for ex in built.examples("eval", ["question"]) if ex.source == "ct_open"]
  assert len(eval_q) == n_summer_q
  for q in eval_q:
    assert all(getattr(q, k) for k in CT_OPEN_KEYS) and q.trial_id in eval_trials
    assert q.nct_id == q.trial_id and q.question_index >= 0
  for s in ("train", "dev", "rl"):
    for ex in built.examples(s):
      assert ex.trial_id not in eval_trials, (s, ex.id)
      assert ex.anchor_trial_id not in eval_trials, (s, ex.id)
  winter = safe_pickle.load(root / "ct_open" / "Winter_2025.pickle")
  trained = {ex.trial_id for s in ("train", "dev", "rl") for ex in built.examples(s)}
  assert {k[0] for k in winter} - eval_trials <= trained


def test_second_call_reuses_and_a_changed_key_rebuilds(built, root):
  cfg = _cfg(root, built.dir)
  stamp = (built.dir / "fingerprint.json").stat().st_mtime_ns
  again = _build(cfg)
  assert again.report.get("reused") is True
  assert (built.dir / "fingerprint.json").stat().st_mtime_ns == stamp
  assert again.examples("eval") == built.examples("eval")
  other = built.dir.parent / "other"
  first = _build(_cfg(root, other))
  changed = _build(_cfg(root, other, seed=1))
  assert not changed.report.get("reused") and changed.report["fingerprint"] != first.report[
      "fingerprint"]


def test_truncated_xml_is_counted_and_skipped(root, tmp_path):
  bad_root = tmp_path / "root"
  shutil.copytree(root, bad_root)
  text = (bad_root / "ctgov_xml" / "NCT00000392.xml").read_text()
  (bad_root / "ctgov_xml" / "NCT99999999.xml").write_text(text[: len(text) // 2])
  b = _build(_cfg(bad_root, tmp_path / "build"))
  rec = b.report["records"]["ctgov_xml"]
  assert rec["skipped"]["bad_xml"]["count"] == 1 and rec["read"] == len(XML_IDS)
  assert rec["skipped"]["bad_xml"]["examples"] == ["NCT99999999"]


def test_crash_while_writing_keeps_the_previous_build(root, tmp_path, monkeypatch):
  out = tmp_path / "build"
  cfg = _cfg(root, out)
  first = _build(cfg)
  before = first.examples("train")
  real = build_stream.write_splits

  def crashing(kept, directory):  # in a worker process: forked, so it sees the patch
    kept = list(kept)
    real(kept[: len(kept) // 2], directory)
    raise OSError("disk full (simulated)")

  monkeypatch.setattr(build_stream, "write_splits", crashing)
  with pytest.raises(OSError, match="simulated"):
    _build(_cfg(root, out, seed=7))
  monkeypatch.setattr(build_stream, "write_splits", real)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]  # no staging left behind
  again = _build(cfg)
  assert again.report.get("reused") is True and again.examples("train") == before
  Tokenizer.load(again.tokenizer_path)


def test_examples_round_trip_through_json(built):
  for s in built.splits:
    for ex in built.examples(s):
      assert Example.from_json(json.loads(json.dumps(ex.to_json()))) == ex


def test_data_config_has_exactly_the_config_keys():
  assert {f.name for f in dataclasses.fields(DataConfig)} == set(common.data().keys())


def test_unknown_source_is_a_clear_error(root, tmp_path):
  with pytest.raises(ValueError, match="unknown source.*bogus"):
    _cfg(root, tmp_path, sources=("ct_open", "bogus"))
  with pytest.raises(ValueError, match="data.sources"):
    _cfg(root, tmp_path, sources="ct_open,ctgov_xml")


def _check_real_build(root):
  """The default config's build on `root`, checked against the raw sources (issue 9 item 2,
  issue 11): anchors time-respecting, never from eval. Returns figures for the thresholds."""
  from data_pipeline.readers import ctgov_json, ctgov_xml
  from data_pipeline.build_report import BuildReport
  cfg = DataConfig(**common.data().to_dict())
  by_split, found, eval_ids = build.make_examples(cfg, root, BuildReport())
  summer_raw = safe_pickle.load(root / "ct_open" / "Summer_2025.pickle")
  summer = {k[0] for k in summer_raw}
  assert eval_ids == summer
  posted = {t.id: t.results_posted for t in
            ctgov_xml.read_ctgov_xml(root / "ctgov_xml", BuildReport())
            + ctgov_json.read_ctgov_json(root / "ctgov_json", BuildReport())}
  cutoff = {"Winter_2025": "2025-02-01", "Summer_2025": "2025-09-01"}

  def public(ex_id, source, trial):  # read from the id / the raw file, not the Example
    return cutoff[ex_id.split(":")[1]] if source == "ct_open" else posted[trial]

  eval_targets = {ex.trial_id for ex in by_split["eval"]}
  assert eval_targets <= summer
  n_cross = 0
  for split, exs in by_split.items():
    for ex in exs:
      if ex.kind not in ("natural_pair", "approximate_pair", "chain"):
        continue
      if ex.kind == "natural_pair":
        assert split in ("train", "rl") and ex.anchor_trial_id == ex.trial_id
        continue
      n_cross += 1
      a = ex.anchor
      assert a.trial_id != ex.trial_id and a.trial_id not in summer, ex.id
      assert a.trial_id not in eval_targets
      assert public(a.id, a.id.split(":")[0], a.trial_id) < public(
          ex.id.split("->", 1)[1], ex.source, ex.trial_id), ex.id
  train_cross = sum(ex.kind in ("approximate_pair", "chain") for s in ("train", "rl")
                    for ex in by_split[s])
  assert len(found.retriever.ids) and not set(found.retriever.ids) & summer  # fitted on non-eval
  per_target = collections.Counter(ex.id.split("->", 1)[1] for ex in by_split["eval"]
                                   if ex.kind != "question")
  assert max(per_target.values()) <= cfg.anchors_k
  n_summer = sum(len(v["question_list_of_lists"]) for v in summer_raw.values())
  return n_cross, train_cross, found.coverage["eval"], n_summer


def test_build_anchors_are_time_respecting_and_never_eval(data_root):
  n_cross, train_cross, cov, n_summer = _check_real_build(data_root)
  assert n_cross > 100 and train_cross > 50
  assert cov["targets"] == n_summer and cov["with_k"] / cov["targets"] >= 0.95


def test_real_build_anchors_are_time_respecting_and_never_eval(full_data):
  """On the full data (../shared/data): thousands of cross-trial pairs, 95% coverage."""
  n_cross, train_cross, cov, _ = _check_real_build(full_data)
  assert n_cross >= 5000
  assert train_cross >= 2000  # thousands of approximate pairs / chains to train on
  assert cov["targets"] == 857 and cov["with_k"] / cov["targets"] >= 0.95


def test_bad_anchor_keys_are_clear_errors(root, tmp_path):
  with pytest.raises(ValueError, match="data.factor_order"):
    _cfg(root, tmp_path, factor_order=("population", "outcome"))
  with pytest.raises(ValueError, match="data.factor_order"):
    _cfg(root, tmp_path, factor_order=list(common.data().factor_order))
  with pytest.raises(ValueError, match="data.retriever"):
    _cfg(root, tmp_path, retriever="sbert")
  with pytest.raises(ValueError, match="data.anchors_k"):
    _cfg(root, tmp_path, anchors_k=0)


def test_no_prompt_is_left_for_a_consumer_to_cut(built):
  """Every prompt fits prompt_len with BOS (RL / eval rows) and seq_len with its completion,
  BOS and EOS (SFT rows): checked with the build's own tokenizer; the report counts the
  prompts whose fields were cut."""
  cfg = common.data()  # the tiny build keeps the declared prompt_len / seq_len
  tok = Tokenizer.load(built.tokenizer_path)
  for s in built.splits:
    exs = built.examples(s)
    for ex in exs:
      n = len(tok.encode(ex.prompt))
      assert 1 + n <= cfg.prompt_len and n + len(tok.encode(ex.completion)) + 2 <= cfg.seq_len
    counts = built.report["prompts"][s]
    assert counts["shortened"] == sum(ex.prompt_fields_cut > 0 for ex in exs)
    assert counts["examples"] == len(exs) and counts["max_tokens"] <= cfg.prompt_len


def test_without_ct_open_the_registry_trials_posted_last_are_eval(data_root, tmp_path):
  """Offline on the embedded sample: eval = the latest-posted registry trials, their questions
  in benchmark form (key, category), never an anchor, and the report says what eval is."""
  from data_pipeline import questions
  from data_pipeline.build_report import BuildReport
  from data_pipeline.readers import ctgov_xml
  shutil.copytree(data_root / "ctgov_xml", tmp_path / "ctgov_xml")
  cfg = _cfg(tmp_path, tmp_path / "build", sources=("ct_open", "ctgov_xml"))
  report = BuildReport()
  by_split, _, eval_ids = build.make_examples(cfg, tmp_path, report)
  assert report.n_skipped("ct_open", "missing_file") == sum(
      len(build.ct_open_files(tmp_path, rel)) for rel in build.CT_OPEN_RELEASES)
  trials = {t.id: t for t in ctgov_xml.read_ctgov_xml(tmp_path / "ctgov_xml", BuildReport())}
  kept = {t.id for t in build.filter_registry(list(trials.values()), cfg, BuildReport())}
  with_q = sorted({q.trial_id for q in questions.derive_all([trials[i] for i in kept])
                   if q.question_type in questions.BENCHMARK_META},
                  key=lambda i: (trials[i].results_posted, i))
  n_eval = round(cfg.registry_eval_fraction * len(with_q))
  assert n_eval > 0 and eval_ids == set(with_q[-n_eval:])
  latest_other = max(trials[i].results_posted for i in with_q[:-n_eval])
  assert all(trials[i].results_posted >= latest_other for i in eval_ids)
  eval_qs = [ex for ex in by_split["eval"] if ex.kind == "question"]
  assert eval_qs and {ex.trial_id for ex in eval_qs} <= eval_ids
  assert all(ex.nct_id == ex.trial_id and ex.question_index >= 0 and ex.category
             and ex.question_type in questions.BENCHMARK_META for ex in eval_qs)
  keys = [(ex.nct_id, ex.endpoint_str, ex.question_index) for ex in eval_qs]
  assert len(set(keys)) == len(keys)
  for exs in by_split.values():
    assert not any(ex.anchor is not None and ex.anchor.trial_id in eval_ids for ex in exs)
  assert build.eval_source(by_split["eval"]).startswith("Registry-derived questions (not CT")
  off = dataclasses.replace(cfg, registry_eval_fraction=0.0)
  assert build.prepare(off, tmp_path, BuildReport()).eval_ids == set()  # no render needed


def test_streamed_build_writes_what_the_stages_make_in_memory(root, tmp_path, monkeypatch):
  """build_dataset streams examples to files from 2 worker processes, in segments (the
  cross-trial pairs of 5 questions each), and never holds them; the same stages held in memory
  (make_examples), fitted to the build's tokenizer and written with Example.to_json as
  before streaming, give byte-identical files and the same report counts."""
  from data_pipeline import templates
  from data_pipeline.build_report import BuildReport
  monkeypatch.setattr(build_stream, "QUESTION_CHUNK", 5)
  monkeypatch.setattr(build_stream, "WORKERS", 2)
  cfg = _cfg(root, tmp_path / "build")
  built = _build(cfg)
  by_split, _, _ = build.make_examples(cfg, root, BuildReport())
  tok = Tokenizer.load(built.tokenizer_path)
  n_tokens = lambda text: len(tok.encode(text))  # noqa: E731
  assert tuple(by_split) == built.splits
  for s, exs in by_split.items():
    fitted = []
    for ex in exs:
      limit = min(cfg.prompt_len - 1, cfg.seq_len - 2 - n_tokens(ex.completion))
      try:
        fitted.append(templates.fit_to_tokens(ex, n_tokens, limit))
      except templates.PromptTooLong:
        continue
    lines = [json.dumps(ex.to_json(), ensure_ascii=False, sort_keys=True) for ex in fitted]
    assert (built.dir / "examples" / f"{s}.jsonl").read_text(encoding="utf-8").splitlines() \
        == lines, s
    assert built.report["split_sizes"][s] == len(fitted)
    assert built.report["split_sizes_by_kind"][s] == dict(
        collections.Counter(ex.kind for ex in fitted))
    assert built.report["label_balance"][s] == build.label_balance(fitted)
  assert sum(ex.kind in ("approximate_pair", "chain") for exs in by_split.values()
             for ex in exs) > 10  # the cross-trial pairs that streaming is for are there


def test_a_failed_check_while_streaming_leaves_no_file(tmp_path):
  from data_pipeline import splits

  def kept():
    yield "train", _ex(("a", "b"), 0)
    raise splits.LeakageError("held-out trials seen in train: ['T']")  # split_checked's end

  with pytest.raises(splits.LeakageError):
    build_stream.write_splits(kept(), tmp_path / "out")
  assert list((tmp_path / "out").iterdir()) == []
