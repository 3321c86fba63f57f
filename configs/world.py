"""The controlled trial world: does learning from counterfactual pairs transfer? Six arms, equal compute.

On this 2-core CPU (the `mini` model, 3 seeds, under 30 minutes):
  python launch/main.py --config=configs/world.py
A look in a few minutes (one seed, few steps):
  python launch/main.py --config=configs/world.py:quick --workdir=/tmp/world_quick
A larger world and model on an accelerator (one GPU / TPU host):
  python launch/main.py --config=configs/world.py --workdir=runs/world_large \\
    --config.model.preset=small --config.world.n_drugs=24 --config.world.n_conditions=12 \\
    --config.world.trials_per_combo=12 --config.experiment.steps=3000 \\
    --config.experiment.rl_steps=600 --config.sft.global_batch_size=64 \\
    --config.rl.prompts_per_step=16 --config.experiment.seeds=5
Arms (experiment.steps optimizer steps each, sft.global_batch_size sequences per step):
questions (SFT on questions), pairs (SFT on questions + natural pairs), grpo (the pairs arm's
SFT for steps - rl_steps, then GRPO on approximate pairs for rl_steps), imagining (the grpo
model, answering held-out questions by stepwise imagining from anchors), arms (SFT on questions,
natural pairs and the per-arm operators' examples), arm_walks (the arms model answering by
per-arm walks from anchors: each step writes both arms' values, then compares). Held-out splits:
test_combo ((drug, condition) combinations never trialled in training) and test_dose
(doses of seen drugs never given in training). Writes <workdir>/report/{world.md,
world.json, world.png}.
"""
import ml_collections

from configs import common
from configs import rl as rl_config


def world() -> ml_collections.ConfigDict:
  """The generator: every parameter of the hidden mechanism and of the trials drawn from it."""
  w = ml_collections.ConfigDict()
  w.seed = 0  # the same seed gives the same world
  w.n_conditions = 6
  w.n_drugs = 10
  w.combo_fraction = 0.6  # share of (drug, condition) combinations ever trialled
  w.trials_per_combo = 8
  w.dose_levels = (0.125, 0.25, 0.5, 0.75, 1.0)  # fractions of a drug's top dose
  w.top_doses_mg = (10.0, 40.0, 100.0, 400.0)
  w.curve_weights = (0.35, 0.4, 0.25)  # linear, emax (saturating), inverted_u
  w.emax_ed50 = 0.2
  w.potency_mean = 0.5  # effect in units of the participant noise sd
  w.drug_sd = 0.35
  w.condition_sd = 0.1
  w.interaction_sd = 0.1
  w.outcomes_per_condition = 3
  w.outcomes_per_trial = 3
  w.sensitivity_min = 0.3
  w.sensitivity_max = 1.2
  w.lower_better_fraction = 0.5
  w.severe_fraction = 0.4
  w.severe_multiplier = 1.4
  w.older_fraction = 0.3
  w.older_multiplier = 0.7
  w.regions = ("North America", "Europe", "East Asia", "Latin America")
  w.region_sd = 0.15
  w.active_comparator_fraction = 0.25
  w.both_comparators_fraction = 0.15
  w.multi_dose_fraction = 0.5
  w.design_change_fraction = 0.5
  w.n_per_arm_min = 20
  w.n_per_arm_max = 120
  w.phase3_fraction = 0.4
  w.phase3_n_multiplier = 2.0
  w.noise_sd = 1.0
  w.first_year = 2010
  w.last_year = 2022
  w.heldout_combo_fraction = 0.2
  w.heldout_doses_per_drug = 1
  w.heldout_dose_trial_fraction = 0.1  # trials of a training combination that give that dose
  w.dev_fraction = 0.1
  w.rl_fraction = 0.1
  return w


def experiment() -> ml_collections.ConfigDict:
  """The arms at equal compute, and how they are measured."""
  e = ml_collections.ConfigDict()
  e.seeds = 3  # training seeds per arm (model init and data order); the world is fixed
  e.steps = 400  # optimizer steps of every arm (questions arm: ~6 epochs of its questions)
  e.rl_steps = 70  # of which GRPO steps in the grpo / imagining arms
  e.anchors_k = 3  # anchors retrieved per target (anchors.find_anchors): pairs and chains
  e.retriever = "tfidf"  # or "bm25"
  e.bootstrap = 200  # resamples of the held-out questions for the confidence intervals
  e.ci = 0.95
  e.splits = ("test_combo", "test_dose")  # held-out splits that are scored
  return e


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "world"
  c.workdir = "runs/world"
  c.seed = 0  # the first training seed; seed i of the arms is seed + i
  # `mini` (0.4M parameters past the embedding): tiny's max_seq_len (256) is shorter than a
  # pair prompt (up to ~380 tokens: BPE pieces do not cross spaces, so about a token a word),
  # which GRPO must sample after. At this budget `small` learnt nothing (40 steps, 67 min:
  # every arm at the majority baseline, measured under load); mini takes 10x the steps in
  # 23 min on 2 quiet cores, and its questions arm learns (README: the trial world).
  c.model = common.model("mini")
  c.mesh = common.mesh()
  c.data = common.data()
  c.data.sources = ()  # the world is the only source (built by data_pipeline.world_build)
  c.data.vocab_size = 2000  # the world's text supports about 1300 pieces (a warning says so)
  c.data.seq_len = 384  # the longest training example is about 380 tokens: none is cut
  c.data.prompt_len = 384
  c.data.pack = True  # equal tokens per step in every arm
  c.sft = common.sft(steps=40, batch=8)  # steps and kinds are set per arm
  c.sft.checkpoint_every = 1000
  c.sft.log_every = 20
  c.rl = rl_config.rl_section(steps=10)  # steps set per arm from experiment.rl_steps
  c.rl.splits = ("train", "rl")
  c.rl.kinds = ("approximate_pair", "chain")  # cross-trial pairs: one factor apart, or more
  c.rl.prompts_per_step = 2  # x group_size 4 = 8 sequences per step, as SFT
  c.rl.checkpoint_every = 1000
  c.rl.beta = 0.0
  c.eval = common.eval_()
  c.eval.imagining_k = 2
  c.eval.max_new_tokens = 32  # an ESTIMATE line of two 4-digit values is about 20 tokens here
  c.eval.rf_seeds = (0,)
  c.world = world()
  c.experiment = experiment()
  if variant == "quick":
    c.workdir = "runs/world_quick"
    c.world.n_drugs = 4
    c.world.n_conditions = 3
    c.world.combo_fraction = 1.0
    c.world.trials_per_combo = 4
    c.world.heldout_dose_trial_fraction = 0.3
    c.experiment.seeds = 1
    c.experiment.steps = 3
    c.experiment.rl_steps = 1
    c.experiment.bootstrap = 20
    c.eval.cv_folds = 2  # the references' hyper-parameter search: 2 folds for a quick look
    c.rl.max_new_tokens = 12
  elif variant:
    raise ValueError(f"configs/world.py: unknown variant {variant!r} (have: quick)")
  return c
