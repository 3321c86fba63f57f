"""A generated trial world with hidden mechanisms, in the normalised schema (schema.Trial).

Why: on real data the method's claim (learning how a result moves under one
controlled change transfers to unseen trials) needs a pretrained backbone; here
the truth is known and small, so the claim can be tested on a CPU. Every stage
downstream (questions, facts, pairs, retrieval, templates, splits, evaluation)
runs on these trials unchanged.

The mechanism (hidden; `World.mechanism`): a drug's potency in a condition is
potency_mean + a drug effect + a condition effect + an interaction (so unseen
(drug, condition) combinations are predictable from their parts only in part);
its dose-response curve is linear, saturating (Emax) or inverted-U; each outcome
measure of a condition has a sensitivity and a polarity (higher or lower is
better); severe disease and older patients multiply the effect, each region
multiplies it by its own factor. An arm's true mean on a measure is
pol * sensitivity * effect (0 for placebo); every participant's value is drawn
from Normal(true mean, noise_sd), and each study arm is compared with each
comparator by Welch's t-test on those draws, so "no significant difference"
comes from small effects and small samples, never from a rule.

Trials of one (drug, condition) share a base design (phase, region, age band,
severity, comparator) and change at most one of these (never severity, which
facts.population cannot see and which would be a silent second factor in a
pair), and their doses: so cross-trial pairs one factor apart occur as they do
in registries. Dates: start, completion, and the results-first-posted date
(`Trial.results_posted`), which the time rule for anchors reads.
"""
from __future__ import annotations

import dataclasses
import datetime

import numpy as np
from scipy import stats

from data_pipeline.facts import COUNTRY_REGION
from data_pipeline.schema import (Analysis, Arm, ArmValue, Dose, Eligibility, Intervention,
                                  Outcome, Trial, validate_trial)

CURVES = ("linear", "emax", "inverted_u")
AGE_BANDS = {"adult": (18.0, 64.0), "older adult": (65.0, None)}
SEVERITIES = ("mild to moderate", "severe")
SOURCE = "synthetic"  # example.SOURCES has no "world"; the trial ids say WORLD
_SYLLABLES = ("ba", "ce", "di", "fo", "ga", "lu", "mi", "no", "pra", "re", "si", "ta", "vo",
              "xe", "zu", "ke")
_DRUG_SUFFIXES = ("mab", "tinib", "pril", "statin", "zole", "vir", "parin", "lukast")
_CONDITION_SUFFIXES = ("syndrome", "disease", "arthritis", "dermatitis", "neuropathy", "colitis")
_MEASURES = ("composite score", "activity index", "panel score", "biomarker level",
             "function scale", "symptom index")
COMPARISON_METHOD = "Welch t-test"
CI_PCT = 95.0


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """The `world` config section (configs/world.py declares every key once)."""
  seed: int
  n_conditions: int
  n_drugs: int
  combo_fraction: float  # share of (drug, condition) combinations that are ever trialled
  trials_per_combo: int
  dose_levels: tuple[float, ...]  # fractions of a drug's top dose, ascending, last 1.0
  top_doses_mg: tuple[float, ...]  # a drug's top dose is drawn from these
  curve_weights: tuple[float, ...]  # probabilities of CURVES
  emax_ed50: float  # Emax curves: half-effect dose as a fraction of the top dose
  potency_mean: float  # effect in units of noise_sd, before the modifiers
  drug_sd: float
  condition_sd: float
  interaction_sd: float
  outcomes_per_condition: int
  outcomes_per_trial: int
  sensitivity_min: float
  sensitivity_max: float
  lower_better_fraction: float
  severe_fraction: float
  severe_multiplier: float
  older_fraction: float
  older_multiplier: float
  regions: tuple[str, ...]  # facts.COUNTRY_REGION region names
  region_sd: float  # sd of log region multipliers
  active_comparator_fraction: float
  both_comparators_fraction: float  # trials with a placebo and an active comparator arm
  multi_dose_fraction: float
  design_change_fraction: float  # trials that change one factor of their combo's base design
  n_per_arm_min: int
  n_per_arm_max: int
  phase3_fraction: float
  phase3_n_multiplier: float
  noise_sd: float
  first_year: int
  last_year: int
  heldout_combo_fraction: float  # combinations whose every trial is held out
  heldout_doses_per_drug: int  # interior dose levels of each drug never seen in training
  heldout_dose_trial_fraction: float  # trials of a training combination that give such a dose
  dev_fraction: float
  rl_fraction: float

  def __post_init__(self):
    def need(ok, key, what):
      if not ok:
        raise ValueError(f"world.{key}: {what}, got {getattr(self, key)!r}")

    need(self.n_conditions >= 2 and self.n_drugs >= 3, "n_drugs", "need >= 3 drugs, >= 2 conditions")
    need(isinstance(self.dose_levels, tuple) and len(self.dose_levels) >= 3
         and list(self.dose_levels) == sorted(set(self.dose_levels))
         and self.dose_levels[-1] == 1.0 and self.dose_levels[0] > 0, "dose_levels",
         "a tuple of >= 3 ascending fractions in (0, 1], the last 1.0")
    need(len(self.curve_weights) == len(CURVES) and min(self.curve_weights) >= 0
         and abs(sum(self.curve_weights) - 1) < 1e-9, "curve_weights",
         f"{len(CURVES)} probabilities for {CURVES} summing to 1")
    need(0 <= self.heldout_doses_per_drug <= len(self.dose_levels) - 2,
         "heldout_doses_per_drug", "at most the number of interior dose levels")
    need(set(self.regions) <= set(COUNTRY_REGION.values()) and len(self.regions) >= 2,
         "regions", f"two or more of {sorted(set(COUNTRY_REGION.values()))}")
    need(1 <= self.outcomes_per_trial <= self.outcomes_per_condition, "outcomes_per_trial",
         "between 1 and outcomes_per_condition")
    need(2 <= self.n_per_arm_min <= self.n_per_arm_max, "n_per_arm_min",
         "2 <= n_per_arm_min <= n_per_arm_max")
    need(self.first_year < self.last_year, "first_year", "before last_year")
    need(0 < self.combo_fraction <= 1 and 0 <= self.heldout_combo_fraction < 1,
         "combo_fraction", "in (0, 1] (heldout_combo_fraction in [0, 1))")


@dataclasses.dataclass(frozen=True)
class Mechanism:
  """The hidden truth the trials are drawn from (never shown to a model)."""
  drugs: tuple[str, ...]
  conditions: tuple[str, ...]
  potency_DC: np.ndarray  # [drugs, conditions], in units of noise_sd
  curves: tuple[str, ...]  # per drug, one of CURVES
  top_dose_mg: tuple[float, ...]  # per drug
  measures: tuple[tuple[str, ...], ...]  # per condition, its outcome measure titles
  sensitivity_CM: np.ndarray  # [conditions, measures]
  lower_better_CM: np.ndarray  # [conditions, measures] bool
  region_multiplier: dict  # region -> factor
  combos: tuple[tuple[int, int], ...]  # (drug, condition) pairs ever trialled
  heldout_combos: frozenset  # of (drug, condition)
  heldout_doses: dict  # drug index -> frozenset of dose amounts (mg) never seen in training


@dataclasses.dataclass(frozen=True)
class ArmPlan:
  """What an arm is in the mechanism: its drug (-1 placebo) and dose."""
  drug: int
  dose_mg: float


@dataclasses.dataclass(frozen=True)
class World:
  trials: tuple[Trial, ...]  # results_posted: the date the time rule for anchors reads
  mechanism: Mechanism
  combo_of: dict  # trial id -> (drug, condition) of its study arms
  arm_plans: dict  # trial id -> {arm label: ArmPlan}
  draws: dict  # (trial id, outcome index, arm label) -> participant values (float64)


def curve(kind: str, x: float, ed50: float) -> float:
  """The dose-response shape at dose fraction x in [0, 1]; 1 at the top dose (0 for inverted-U)."""
  if kind == "linear":
    return x
  if kind == "emax":
    return x / (x + ed50) * (1 + ed50)
  if kind == "inverted_u":
    return 4.0 * x * (1.0 - x)
  raise ValueError(f"unknown dose-response curve {kind!r}; known {CURVES}")


def welch(a: np.ndarray, b: np.ndarray, ci_pct: float = CI_PCT):
  """(mean difference a - b, two-sided p, CI low, CI high) of Welch's unequal-variance t-test."""
  va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
  se = np.sqrt(va + vb)
  df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
  diff = float(a.mean() - b.mean())
  p = float(2.0 * stats.t.sf(abs(diff) / se, df))
  half = float(stats.t.ppf(0.5 + ci_pct / 200.0, df) * se)
  return diff, p, diff - half, diff + half


def _unique_names(rng, n, suffixes, sep: str) -> tuple[str, ...]:
  """n distinct made-up names: two syllables, `sep`, a suffix ("Badi syndrome", "Badimab")."""
  names: list[str] = []
  while len(names) < n:
    name = "".join(rng.choice(_SYLLABLES, size=2)).capitalize() + sep + rng.choice(suffixes)
    if name not in names:
      names.append(name)
  return tuple(names)


def make_mechanism(cfg: WorldConfig, rng: np.random.Generator) -> Mechanism:
  """Draws the hidden mechanism: names, potencies, curves, measures, held-out sets."""
  D, C, M = cfg.n_drugs, cfg.n_conditions, cfg.outcomes_per_condition
  drugs = tuple(x.lower() for x in _unique_names(rng, D, _DRUG_SUFFIXES, ""))
  conditions = _unique_names(rng, C, _CONDITION_SUFFIXES, " ")
  potency_DC = (cfg.potency_mean + cfg.drug_sd * rng.standard_normal((D, 1))
                + cfg.condition_sd * rng.standard_normal((1, C))
                + cfg.interaction_sd * rng.standard_normal((D, C)))
  curves = tuple(str(rng.choice(CURVES, p=cfg.curve_weights)) for _ in range(D))
  top = tuple(float(rng.choice(cfg.top_doses_mg)) for _ in range(D))
  measures = tuple(tuple(f"{c} {m}" for m in rng.choice(_MEASURES, size=M, replace=False))
                   for c in conditions)
  sens_CM = rng.uniform(cfg.sensitivity_min, cfg.sensitivity_max, (C, M))
  lower_CM = rng.random((C, M)) < cfg.lower_better_fraction
  regions = {r: float(np.exp(cfg.region_sd * rng.standard_normal())) for r in cfg.regions}
  all_combos = [(d, c) for d in range(D) for c in range(C)]
  keep = rng.random(len(all_combos)) < cfg.combo_fraction
  combos = tuple(x for x, k in zip(all_combos, keep) if k)
  heldout = _heldout_combos(combos, cfg.heldout_combo_fraction, rng)
  interior = len(cfg.dose_levels) - 2
  heldout_doses = {}
  for d in range(D):
    picks = rng.choice(interior, size=cfg.heldout_doses_per_drug, replace=False) + 1
    heldout_doses[d] = frozenset(dose_mg(top[d], cfg.dose_levels[i]) for i in picks)
  return Mechanism(drugs, conditions, potency_DC, curves, top, measures, sens_CM, lower_CM,
                   regions, combos, heldout, heldout_doses)


def _heldout_combos(combos, fraction, rng) -> frozenset:
  """Held-out combinations whose drug and condition both stay in some training combination."""
  heldout: set = set()
  for i in rng.permutation(len(combos)):
    if len(heldout) >= round(fraction * len(combos)):
      break
    d, c = combos[i]
    rest = [x for x in combos if x not in heldout and x != (d, c)]
    if any(x[0] == d for x in rest) and any(x[1] == c for x in rest):
      heldout.add((d, c))
  return frozenset(heldout)


def dose_mg(top: float, fraction: float) -> float:
  """A dose as it is written on a label: 3 significant figures."""
  return float(f"{top * fraction:.3g}")


def _date(rng, year_lo: int, year_hi: int) -> datetime.date:
  span = (datetime.date(year_hi, 12, 31) - datetime.date(year_lo, 1, 1)).days
  return datetime.date(year_lo, 1, 1) + datetime.timedelta(days=int(rng.integers(0, span)))


@dataclasses.dataclass(frozen=True)
class _Design:
  phase: str
  region: str
  age: str
  severity: str
  comparators: tuple[str, ...]  # "placebo" and/or "active"


def _base_design(cfg: WorldConfig, rng) -> _Design:
  comps = ("active",) if rng.random() < cfg.active_comparator_fraction else ("placebo",)
  if rng.random() < cfg.both_comparators_fraction:
    comps = ("placebo", "active")
  return _Design(phase="PHASE3" if rng.random() < cfg.phase3_fraction else "PHASE2",
                 region=str(rng.choice(cfg.regions)),
                 age="older adult" if rng.random() < cfg.older_fraction else "adult",
                 severity=SEVERITIES[int(rng.random() < cfg.severe_fraction)],
                 comparators=comps)


def _vary(design: _Design, cfg: WorldConfig, rng) -> _Design:
  """The base design, or it with one factor changed (never severity: see the module doc)."""
  if rng.random() >= cfg.design_change_fraction:
    return design
  factor = rng.choice(("phase", "region", "age", "comparators"))
  if factor == "phase":
    return dataclasses.replace(design, phase="PHASE2" if design.phase == "PHASE3" else "PHASE3")
  if factor == "region":
    return dataclasses.replace(design, region=str(rng.choice(
        [r for r in cfg.regions if r != design.region])))
  if factor == "age":
    return dataclasses.replace(design, age="adult" if design.age != "adult" else "older adult")
  flip = {("placebo",): ("active",), ("active",): ("placebo",)}
  return dataclasses.replace(design, comparators=flip.get(design.comparators, ("placebo",)))


def _drug_arm(label_id: str, drug: str, dose: float, kind: str) -> Arm:
  text = f"{dose:g} mg"
  iv = Intervention(name=drug, type="DRUG", description=f"{drug} {text} orally once daily",
                    doses=(Dose(text, dose, None, "mg", "oral", "once daily"),))
  return Arm(id=label_id, label=f"{drug} {text}", type=kind, description="oral, once daily",
             interventions=(iv,))


def _placebo_arm(label_id: str) -> Arm:
  iv = Intervention(name="Placebo", type="DRUG", description="matching placebo once daily",
                    doses=(Dose("placebo", 0.0, None, "placebo", "oral", "once daily"),))
  return Arm(id=label_id, label="Placebo", type="PLACEBO_COMPARATOR",
             description="oral, once daily", interventions=(iv,))


class _Generator:
  """Draws trials from a mechanism; one instance per world, one rng stream."""

  def __init__(self, cfg: WorldConfig, mech: Mechanism, rng):
    self.cfg, self.mech, self.rng = cfg, mech, rng
    self.combo_of, self.arm_plans, self.draws = {}, {}, {}

  def effect(self, plan: ArmPlan, c: int, design: _Design) -> float:
    """The arm's effect in units of noise_sd, before the measure's sensitivity and polarity."""
    if plan.drug < 0:
      return 0.0
    m, cfg = self.mech, self.cfg
    shape = curve(m.curves[plan.drug], plan.dose_mg / m.top_dose_mg[plan.drug], cfg.emax_ed50)
    mult = m.region_multiplier[design.region]
    mult *= cfg.severe_multiplier if design.severity == "severe" else 1.0
    mult *= cfg.older_multiplier if design.age == "older adult" else 1.0
    return float(m.potency_DC[plan.drug, c] * shape * mult)

  def doses(self, d: int) -> list[float]:
    """1 to 3 dose levels; a held-out one only in heldout_dose_trial_fraction of trials."""
    cfg, rng = self.cfg, self.rng
    all_doses = [dose_mg(self.mech.top_dose_mg[d], f) for f in cfg.dose_levels]
    held = [x for x in all_doses if x in self.mech.heldout_doses[d]]
    seen = [x for x in all_doses if x not in held]
    n = int(rng.integers(2, 4)) if rng.random() < cfg.multi_dose_fraction else 1
    out = []
    if held and rng.random() < cfg.heldout_dose_trial_fraction:
      out.append(float(rng.choice(held)))
    out += [float(x) for x in rng.choice(seen, size=min(n - len(out), len(seen)), replace=False)]
    return sorted(out)

  def comparator_drug(self, d: int, c: int) -> int | None:
    """A standard-of-care drug for condition c: trialled there, never a held-out combination."""
    options = [x for x, cc in self.mech.combos
               if cc == c and x != d and (x, cc) not in self.mech.heldout_combos]
    return int(self.rng.choice(options)) if options else None

  def trial(self, tid: str, d: int, c: int, design: _Design) -> Trial:
    cfg, m, rng = self.cfg, self.mech, self.rng
    drug, cond = m.drugs[d], m.conditions[c]
    arms, plans = [], {}
    for dose in self.doses(d):
      arm = _drug_arm(f"A{len(arms) + 1}", drug, dose, "EXPERIMENTAL")
      arms.append(arm)
      plans[arm.label] = ArmPlan(d, dose)
    for comp in design.comparators:
      other = self.comparator_drug(d, c) if comp == "active" else None
      if other is None:
        arm, plan = _placebo_arm(f"C{len(arms) + 1}"), ArmPlan(-1, 0.0)
      else:
        top = m.top_dose_mg[other]
        arm = _drug_arm(f"C{len(arms) + 1}", m.drugs[other], top, "ACTIVE_COMPARATOR")
        plan = ArmPlan(other, top)
      if arm.label not in plans:
        arms.append(arm)
        plans[arm.label] = plan
    n_arm = int(rng.integers(cfg.n_per_arm_min, cfg.n_per_arm_max + 1))
    if design.phase == "PHASE3":
      n_arm = int(round(n_arm * cfg.phase3_n_multiplier))
    measures = sorted(rng.choice(cfg.outcomes_per_condition, size=int(
        rng.integers(1, cfg.outcomes_per_trial + 1)), replace=False))
    outcomes = tuple(self.outcome(tid, k, c, int(j), arms, plans, design, n_arm)
                     for k, j in enumerate(measures))
    start = _date(rng, cfg.first_year, cfg.last_year)
    done = start + datetime.timedelta(days=int(rng.integers(300, 900)))
    posted = done + datetime.timedelta(days=int(rng.integers(60, 400)))
    self.combo_of[tid] = (d, c)
    self.arm_plans[tid] = plans
    lo, hi = AGE_BANDS[design.age]
    countries = tuple(sorted(x for x, r in COUNTRY_REGION.items() if r == design.region)[:2])
    title = (f"{design.phase.replace('PHASE', 'Phase ')} study of {drug} in {design.severity} "
             f"{cond} ({design.age} patients)")
    return validate_trial(Trial(
        id=tid, source=SOURCE, title=title, phase=design.phase, conditions=(cond,),
        countries=countries, enrollment=n_arm * len(arms), start_date=start.isoformat(),
        completion_date=done.isoformat(), arms=tuple(arms), outcomes=outcomes,
        eligibility=Eligibility("ALL", lo, hi, f"{design.severity} {cond}"),
        allocation="RANDOMIZED", masking="DOUBLE", results_posted=posted.isoformat()))

  def outcome(self, tid, k, c, j, arms, plans, design, n_arm) -> Outcome:
    m, cfg = self.mech, self.cfg
    lower = bool(m.lower_better_CM[c, j])
    sign = -1.0 if lower else 1.0
    values, draws = [], {}
    for g, arm in enumerate(arms):
      mu = sign * m.sensitivity_CM[c, j] * self.effect(plans[arm.label], c, design)
      x = self.rng.normal(mu, cfg.noise_sd, n_arm)
      draws[arm.label] = x
      self.draws[(tid, k, arm.label)] = x
      values.append(ArmValue(arm_id=f"OG{g:03d}", arm_label=arm.label, value=float(x.mean()),
                             dispersion_type="Standard Deviation",
                             dispersion=float(x.std(ddof=1)), n=n_arm, group_title=arm.label))
    analyses = []
    for ga, a in enumerate(arms):
      if a.type != "EXPERIMENTAL":
        continue
      for gb, b in enumerate(arms):
        if b.type == "EXPERIMENTAL":
          continue
        diff, p, lo, hi = welch(draws[a.label], draws[b.label])
        analyses.append(Analysis(
            arm_ids=(f"OG{ga:03d}", f"OG{gb:03d}"), p_value=p, p_qualifier="=",
            method=COMPARISON_METHOD, param_type="Mean Difference (Final Values)",
            estimate=diff, ci_low=lo, ci_high=hi, ci_pct=CI_PCT, non_inferiority="SUPERIORITY"))
    return Outcome(title=m.measures[c][j], description=f"{m.measures[c][j]} at week 12",
                   type="primary" if k == 0 else "secondary", time_frame="Week 12",
                   unit="points", param_type="Mean", values=tuple(values),
                   analyses=tuple(analyses),
                   polarity="lower_better" if lower else "higher_better")


def generate_world(cfg: WorldConfig) -> World:
  """The world of `cfg`: the same config (seed included) gives the same world."""
  rng = np.random.default_rng(cfg.seed)
  mech = make_mechanism(cfg, rng)
  gen = _Generator(cfg, mech, rng)
  trials = []
  for d, c in mech.combos:
    base = _base_design(cfg, rng)
    for _ in range(cfg.trials_per_combo):
      trials.append(gen.trial(f"WORLD{len(trials):05d}", d, c, _vary(base, cfg, rng)))
  return World(tuple(trials), mech, gen.combo_of, gen.arm_plans, gen.draws)
