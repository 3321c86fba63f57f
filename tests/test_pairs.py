"""pairs: natural pairs inside a trial; cross-trial pairs and chains whose steps are the factors
that differ, read independently from the Trials."""
import collections

from data_pipeline import anchors, facts, pairs, questions
from data_pipeline.build_report import BuildReport
from data_pipeline.readers import ct_open
from data_pipeline.schema import (Analysis, Arm, ArmValue, Dose, Eligibility, Intervention,
                                  Outcome, Trial)

REGION = {"France": "Europe", "Germany": "Europe", "Japan": "East Asia",
          "United States": "North America"}


def _drug_arm(aid, label, drug, mg, typ="EXPERIMENTAL"):
  dose = (Dose(f"{mg} mg", float(mg), None, "mg", "oral", "daily"),) if mg else ()
  return Arm(aid, label, typ, f"{drug} {mg} mg" if mg else drug,
             (Intervention(drug, "DRUG", "", dose),))


def _an(a, b, p):
  return Analysis((a, b), p, "=", "", "", None, None, None, None, "Superiority")


def _trial(tid, *, countries=("France",), phase="PHASE3", mg=10, comparator="placebo",
           sex="ALL", min_age=18.0, drug="Drug X", outcomes=None):
  comp = (Arm("P2", "Placebo", "PLACEBO_COMPARATOR", "placebo",
              (Intervention("Placebo", "DRUG", "", ()),)) if comparator == "placebo"
          else _drug_arm("P2", "Standard care", "Drug Y", 0, "ACTIVE_COMPARATOR"))
  arms = (_drug_arm("P1", drug, drug, mg), comp)
  vals = (ArmValue("O1", drug, 30.0), ArmValue("O2", comp.label, 50.0))
  outcomes = outcomes or (Outcome("Pain score at week 12", "", "primary", "12 weeks", "", "",
                                  vals, (_an("O1", "O2", 0.01),), "lower_better"),)
  return Trial(tid, "ctgov_xml", f"Study {tid} of {drug} for pain", phase, ("Chronic pain",),
               tuple(countries), 100, "", "", arms, outcomes,
               Eligibility(sex, min_age, None, ""))


def _dose_trial():
  arms = (_drug_arm("P1", "X low", "Drug X", 10), _drug_arm("P2", "X high", "Drug X", 20),
          Arm("P3", "Placebo", "PLACEBO_COMPARATOR", "placebo", ()),
          _drug_arm("P4", "Standard care", "Drug Y", 0, "ACTIVE_COMPARATOR"))
  vals = (ArmValue("O1", "X low", 30.0), ArmValue("O2", "X high", 20.0),
          ArmValue("O3", "Placebo", 50.0), ArmValue("O4", "Standard care", 25.0))
  ans = (_an("O1", "O3", 0.2), _an("O2", "O3", 0.001), _an("O2", "O4", 0.04))
  outs = (Outcome("Pain score at week 12", "", "primary", "", "", "", vals, ans, "lower_better"),
          Outcome("Number of participants with relapse", "", "secondary", "", "", "", vals,
                  ans, "lower_better"))
  return Trial("NCTDOSE", "ctgov_xml", "Dose ranging of X", "PHASE2", ("Pain",), ("France",),
               80, "", "", arms, outs, None)


def _questions(trials):
  qs = questions.derive_all(trials, question_types=("superiority", "comparative"))
  return facts.attach_facts(qs, {t.id: t for t in trials})


def test_natural_pairs_inside_one_trial():
  t = _dose_trial()
  report = BuildReport()
  ps = pairs.natural_pairs(_questions([t]), report)
  by_type = collections.defaultdict(list)
  for p in ps:
    by_type[p.perturbation].append(p)
    assert p.kind == "natural_pair" and p.trial_id == p.anchor_trial_id == "NCTDOSE"
    assert p.anchor.question_type == p.question_type
    assert p.prompt and p.completion.startswith("DECISION: (")
    assert report.n_read(f"pairs:natural_pair:{p.perturbation}") == len(
        [x for x in ps if x.perturbation == p.perturbation])
  dose = by_type["dose"]
  assert dose and all(p.arm_b == "Placebo" for p in dose)
  assert {(p.factors[0].anchor_value, p.factors[0].target_value) for p in dose} == {
      ("10 mg", "20 mg"), ("20 mg", "10 mg")}
  # high dose vs placebo is significant (p=0.001, lower pain) -> target label 0
  hi = [p for p in dose if p.arm_a == "X high" and p.question_type == "superiority"]
  assert hi[0].label == 0 and hi[0].anchor.label == 1
  comp = by_type["comparator"]
  assert comp and all(p.arm_a == "X high" for p in comp)
  assert {p.factors[0].target_value for p in comp} == {"Placebo", "Standard care"}
  outc = by_type["outcome"]
  assert outc and all(p.anchor.options == p.options for p in outc)
  assert set(by_type) == {"dose", "comparator", "outcome"}
  assert pairs.natural_pairs(_questions([_dose_trial()])) == ps  # deterministic


def _independent_factors(a: Trial, b: Trial) -> set:
  """What differs between two one-comparison trials, read straight from the Trials."""
  def comp(t):
    return "placebo" if t.arms[1].type == "PLACEBO_COMPARATOR" else "active"

  def pop(t):
    return (t.eligibility.sex, t.eligibility.min_age_years)
  out = set()
  if {REGION[c] for c in a.countries} != {REGION[c] for c in b.countries}:
    out.add("country")
  if a.phase != b.phase:
    out.add("phase")
  if a.arms[0].interventions[0].doses[0].amount != b.arms[0].interventions[0].doses[0].amount:
    out.add("dose")
  if a.arms[0].interventions[0].name != b.arms[0].interventions[0].name:
    out.add("drug")
  if comp(a) != comp(b):
    out.add("comparator")
  if pop(a) != pop(b):
    out.add("population")
  return out


def _family():
  return [
      _trial("NCT1"),
      _trial("NCT2", countries=("Japan",)),                       # country
      _trial("NCT3", phase="PHASE2"),                             # phase
      _trial("NCT4", mg=40),                                      # dose
      _trial("NCT5", comparator="active"),                        # comparator
      _trial("NCT6", min_age=65.0),                               # population
      _trial("NCT7", countries=("Germany", "France")),            # same region as NCT1
      _trial("NCT8", countries=("Japan",), phase="PHASE2"),       # two factors
      _trial("NCT9", drug="Drug Z"),                              # another drug
  ]


def test_cross_trial_pairs_list_exactly_the_differing_factors_in_order():
  trials = _family()
  by_id = {t.id: t for t in trials}
  qs = [q for q in _questions(trials) if q.question_type == "superiority"]
  report = BuildReport()
  order = tuple(reversed(facts.FACTORS))
  seen = collections.Counter()
  for target in qs:
    found = [anchors.Retrieved(a, 0.5) for a in qs if a.trial_id != target.trial_id]
    for p in pairs.cross_trial_pairs(target, found, order, report):
      diff = _independent_factors(by_id[p.anchor_trial_id], by_id[p.trial_id])
      assert {f.factor for f in p.factors} == diff, p.id
      assert [f.factor for f in p.factors] == [f for f in order if f in diff]  # walk order
      assert p.kind == ("chain" if len(diff) >= 2 else "approximate_pair")
      assert p.perturbation == "+".join(sorted(diff)) and p.similarity == 0.5
      assert p.label == target.label and p.anchor.label == next(
          a.label for a in qs if a.id == p.anchor.id)
      # allocation / masking are unknown in these trials: listed, never steps
      assert {"allocation", "masking"} <= set(p.unknown_factors)
      if p.factors:
        assert "Change one factor at a time:" in p.prompt or "Changed:" in p.prompt
      seen[len(diff)] += 1
  assert set(seen) == {0, 1, 2, 3}
  assert report.n_read("pairs:chain:2_factors") + report.n_read("pairs:chain:3_factors") == (
      seen[2] + seen[3])
  assert report.n_read("pairs:approximate_pair:0_factors") == seen[0]
  one = [p for p in pairs.cross_trial_pairs(qs[0], [anchors.Retrieved(qs[7], 0.1)],
                                            facts.FACTORS)]
  assert [(f.factor, f.anchor_value, f.target_value) for f in one[0].factors] == [
      ("phase", "PHASE2", "PHASE3"), ("country", "East Asia", "Europe")]
  assert one[0].kind == "chain" and "1 phase: PHASE2 -> PHASE3" in one[0].prompt


def test_real_ct_open_pairs(full_data):
  r = BuildReport()
  qs, trials = [], {}
  for name in ("Winter_2025", "Summer_2025"):
    path = full_data / "ct_open" / f"{name}.pickle"
    qs += ct_open.read_questions(path, r)
    for t in ct_open.read_trials(path, r):
      trials.setdefault(t.id, t)
  qs = facts.attach_facts(qs, trials)
  nat = pairs.natural_pairs(qs, r)
  kinds = collections.Counter(p.perturbation for p in nat)
  assert kinds["outcome"] > 1000 and kinds["comparator"] > 0
  for p in nat:
    assert p.trial_id == p.anchor_trial_id
    if p.perturbation == "outcome":
      assert p.anchor.options == p.options
      assert p.anchor.endpoint != p.endpoint


def test_dose_pairs_from_result_groups_of_one_arm(data_root):
  """NCT00495469: the dose groups of arm 'GSK189075' pair up against placebo; the 250 mg
  BID group differs in frequency from the QD groups and pairs with none of them."""
  from data_pipeline.readers import ctgov_xml
  t = ctgov_xml.read_ctgov_xml([data_root / "ctgov_xml" / "NCT00495469.xml"], BuildReport())[0]
  ps = [p for p in pairs.natural_pairs(_questions([t]), max_anchors=10)
        if p.perturbation == "dose"]
  steps = {(p.factors[0].anchor_value, p.factors[0].target_value) for p in ps}
  qd = ("100 mg", "250 mg", "500 mg", "1000 mg")
  assert steps == {(a, b) for a in qd for b in qd if a != b}
  for p in ps:
    assert p.arm_b == "Placebo"
    assert "BID" not in p.arm_a and p.arm_a.endswith("mg QD")
    assert p.factors[0].target_value in p.arm_a
