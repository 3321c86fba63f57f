"""The main job: data -> SFT warm start -> GRPO with verifiable rewards -> CT Open eval.

On this 2-core CPU, with no other argument (under 20 minutes, `small` model):
  python launch/main.py --config=configs/rl.py
Tests and a quick look (tiny model, a couple of minutes):
  python launch/main.py --config=configs/rl.py:tiny --workdir=/tmp/rl_tiny
A real model on a TPU/GPU slice (e.g. v5e-16 or 8 x H100), starting from Hugging Face weights:
  python launch/main.py --config=configs/rl.py --workdir=gs://bucket/runs/qwen3_1_7b \\
    --config.model.hf_checkpoint=/ckpt/Qwen3-1.7B --config.model.dtype=bfloat16 \\
    --config.model.remat=True --config.mesh.fsdp=8 --config.mesh.tensor=1 \\
    --config.data.seq_len=2048 --config.data.prompt_len=1536 \\
    --config.sft.steps=2000 --config.sft.global_batch_size=64 \\
    --config.rl.steps=1000 --config.rl.prompts_per_step=64 --config.rl.group_size=8 \\
    --config.rl.max_new_tokens=512 --config.rl.cache_dtype=bfloat16 --config.mesh.multihost=True
(the checkpoint folder's tokenizer.json or tokenizer.model is used, with its chat template.)
The method's own recipe (Gemma-3-12B-it; LoRA rank 64 / alpha 128 / dropout 0.1 on every
linear layer; peak lr 2e-5, 640 warm-up steps, cosine to a 10% floor), on 8 accelerators:
  python launch/main.py --config=configs/rl.py:recipe --workdir=gs://bucket/runs/recipe \
    --config.model.hf_checkpoint=/ckpt/gemma-3-12b-it
Its memory plan before the run (per-device bytes, fits 16 / 80 / 141 GiB; the scanned
layers compile whole in minutes on a CPU):
  python bench/memory.py --config=configs/rl.py:recipe --devices=8
"""
import ml_collections

from configs import common
from data_pipeline import facts


def rl_section(steps: int) -> ml_collections.ConfigDict:
  r = ml_collections.ConfigDict()
  r.steps = steps
  r.splits = ("rl",)  # prompt source; trials here never appear in SFT or eval
  r.kinds = ("question", "approximate_pair", "chain")
  r.prompts_per_step = 8
  r.group_size = 4
  r.max_new_tokens = 16
  r.temperature = 1.0  # > 0: RL needs the log-probs of the distribution it samples
  r.top_k = 0  # RL refuses truncated sampling (top_k > 0, top_p < 1): see RLConfig
  r.top_p = 1.0
  r.eps_low = 0.2
  r.eps_high = 0.28
  r.beta = 0.04  # KL to the SFT policy; 0 disables it and skips the reference forward
  r.aggregation = "token"  # or "sequence"
  r.advantage_scale = "batch_std"  # or "none" (Dr. GRPO); never per-group std: grpo.py
  r.updates_per_rollout = 1  # GRPO's mu; the lr schedule spans steps * updates_per_rollout
  r.recompute_old_logprobs = False
  # Any registered reward (rewards.py): correctness, log_prob, brier are class-balanced over
  # the RL prompts' labels; format is label-blind.
  r.reward_weights = (("correctness", 1.0), ("format", 0.1))
  r.cache_dtype = "float32"
  r.checkpoint_every = 25
  r.keep_checkpoints = 3
  r.log_every = 5
  r.resume = True
  r.optimizer = common.optimizer(lr=1e-4, steps=steps, warmup=5)
  r.optimizer.weight_decay = 0.0
  return r


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "rl"
  c.workdir = "runs/rl"
  c.seed = 0
  c.model = common.model("small")
  c.mesh = common.mesh()
  c.data = common.data()
  c.data.seq_len = 400  # the longest rendered training example is 388 tokens
  c.data.prompt_len = 384  # left-truncated; keeps the options and the question
  c.sft = common.sft(steps=60, batch=16)
  c.sft.kinds = ("question", "natural_pair")
  c.sft.checkpoint_every = 20
  c.rl = rl_section(steps=60)
  c.eval = common.eval_()
  c.eval.imagining_k = 2  # the CPU demo walks 2 of the 7 anchors per target (time)
  c.lora = common.lora()  # rank 0: the whole model trains
  if variant == "tiny":
    c.workdir = "runs/rl_tiny"
    c.model.preset = "tiny"
    c.data.sources = ("synthetic", "ct_open")  # CT Open Summer 2025 is the eval set
    c.data.vocab_size = 512
    c.data.seq_len = 240  # the Summer questions the tiny run evaluates need about 224 tokens
    c.data.prompt_len = 224
    c.sft = common.sft(steps=4, batch=8)
    c.sft.kinds = ("synthetic",)
    c.rl = rl_section(steps=3)
    c.rl.kinds = ("synthetic",)
    c.rl.max_new_tokens = 8
    c.eval.imagining = False
    c.eval.baselines = False
    c.eval.max_questions = 16
  elif variant == "recipe":
    recipe(c)
  elif variant:
    raise ValueError(f"configs/rl.py: unknown variant {variant!r} (have: tiny, recipe)")
  return c


def recipe(c: ml_collections.ConfigDict) -> None:
  """The method's own recipe: Gemma-3-12B-it with LoRA (rank 64, alpha 128, dropout 0.1)
  on every linear layer, peak lr 2e-5 with 640 warm-up steps and a cosine to a 10%
  floor, in both stages; one adapter per factor (lora.route "factor") beside a general
  one. Sized by bench/memory.py for 8 x 80 GiB (see the docstring)."""
  c.workdir = "runs/recipe"
  c.model.preset = "gemma3_12b"  # the shape; the weights come from --config.model.hf_checkpoint
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"  # the frozen base; adapters and their Adam moments are f32
  c.model.remat = True
  c.mesh.fsdp = 8
  c.lora.rank = 64
  c.lora.alpha = 128.0
  c.lora.dropout = 0.1
  # One local operator per factor: a one-factor example (a dose pair, an imagined step)
  # trains and is scored with its factor's adapter, everything else with "general".
  c.lora.adapters = ("general",) + facts.FACTORS
  c.lora.route = "factor"
  c.data.seq_len = 2048
  c.data.prompt_len = 1536
  c.sft = common.sft(steps=6400, batch=64)
  c.sft.kinds = ("question", "natural_pair")
  c.sft.checkpoint_every = 500
  c.rl = rl_section(steps=1600)
  # bench/memory.py (compiled, remat, scanned): 64 prompts x 8 samples need 283 GiB of
  # update temporaries per device on 8 devices (each completion's 262k-vocab logits, the
  # prompt cache fanned out to the samples); 8 prompts (one per device) need 46 GiB.
  c.rl.prompts_per_step = 8
  c.rl.group_size = 8
  c.rl.max_new_tokens = 512
  c.rl.cache_dtype = "bfloat16"
  c.rl.checkpoint_every = 100
  for opt, steps in ((c.sft.optimizer, c.sft.steps), (c.rl.optimizer, c.rl.steps)):
    opt.update(common.optimizer(lr=2e-5, steps=steps, warmup=640))
    opt.end_lr_ratio = 0.1  # the cosine's floor
    opt.weight_decay = 0.0
