"""synthetic: determinism, labels re-derived from the prompt text, small vocabulary."""
import collections
import re

from data_pipeline import synthetic
from deepimagine_jax import rewards


def _label_from_prompt(prompt: str) -> int:
  """Independent reading of the task: rule direction x dose direction."""
  d1 = int(re.search(r"anchor dose (\d+)", prompt).group(1))
  d2 = int(re.search(r"target dose (\d+)", prompt).group(1))
  more = "more dose more response" in prompt
  assert more != ("more dose less response" in prompt)
  goes_up = (d2 > d1) if more else (d2 < d1)
  return 0 if goes_up else 1


def test_same_seed_same_output():
  assert synthetic.make_synthetic(64, 3) == synthetic.make_synthetic(64, 3)
  assert synthetic.make_synthetic(64, 3) != synthetic.make_synthetic(64, 4)


def test_labels_follow_the_rule():
  exs = synthetic.make_synthetic(400, 0)
  for ex in exs:
    assert ex.label == _label_from_prompt(ex.prompt)
    d = rewards.parse_decision(ex.completion, 2)
    assert d.ok and d.choice == ex.label
    assert ex.source == "synthetic" and ex.options == synthetic.OPTIONS
  counts = collections.Counter(ex.label for ex in exs)
  assert 150 < counts[0] < 250  # roughly balanced: chance is 50%
  assert len({ex.id for ex in exs}) == len(exs)


def test_prompts_are_short_and_use_listed_words():
  words = set(synthetic.WORDS)
  for ex in synthetic.make_synthetic(200, 1):
    toks = ex.prompt.split()
    assert len(toks) < 40
    assert set(toks) <= words
    assert set(re.findall(r"DECISION:|\d+|[(),]", ex.completion)) <= words
