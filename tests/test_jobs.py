"""jobs.py: the model shape a run asks for; the main job stops before training with no eval set."""
import types

import pytest

from data_pipeline.example import Example
from deepimagine_jax import jobs


class _Built:
  def __init__(self, eval_examples):
    self.splits = ("train", "eval")
    self._eval = eval_examples

  def examples(self, split, kinds=None):
    return self._eval if split == "eval" else []


def _question(**kw):
  return Example(id="q", source="ctgov_xml", kind="question", trial_id="NCT1",
                 options=("a", "b"), label=0, **kw)


def test_no_eval_questions_is_one_clear_error_naming_the_keys():
  run = types.SimpleNamespace(data=types.SimpleNamespace(sources=("synthetic", "ct_open")))
  for built in (_Built([]), _Built([_question()])):  # nothing, or questions without a key
    with pytest.raises(ValueError, match=r"data.sources=\('synthetic', 'ct_open'\).*ctgov_xml"):
      jobs.require_eval_questions(run, built)
  keyed = _question(nct_id="NCT1", endpoint_str="o0: x", question_index=0,
                    category="2-way/explicit", title="t", endpoint="e", arms=("A", "B"))
  jobs.require_eval_questions(run, _Built([keyed]))  # a benchmark-form question: fine


def test_model_config_honours_scan_layers_and_keeps_the_preset_layout_by_default():
  from configs import common
  from deepimagine_jax.config import ModelConfig, ModelSection
  tok = types.SimpleNamespace(vocab_size=512)
  for preset in ("small", "qwen3_8b"):
    c = common.model(preset)
    section = ModelSection(**c.to_dict())
    assert jobs.model_config(section, tok).scan_layers == getattr(ModelConfig, preset)().scan_layers
    for scan in (True, False):
      c.scan_layers = scan
      assert jobs.model_config(ModelSection(**c.to_dict()), tok).scan_layers is scan
  assert ModelConfig.qwen3_8b().scan_layers and not ModelConfig.small().scan_layers
