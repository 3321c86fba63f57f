"""google-tunix's own GRPO learner on bench/rl_step.py's shape, data and settings.

  python bench/peer_tunix.py --prompts=8 --group=4 --prompt_len=256 --new=64 --steps=5

Run by `bench/rl_step.py --peer=tunix` (in this interpreter or `--peer_python`, a venv
holding google-tunix, so the peer's dependencies never touch the main environment).
Prints one JSON line: {"s_per_step": median seconds, "steps": n, "devices": d}. A step's time is the
gap between two consecutive calls of the reward function (once per step, after the
rollout); the first gap holds the update's compile and is dropped, so compile time is
excluded as in ours. Imports nothing of
deepimagine_jax: the prompts come from the same NumPy generator and seed as ours.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

INSTALL = ('tunix is not importable: pip install -e ".[peer]" (or into a separate venv: '
           'python -m venv --system-site-packages /tmp/peer-venv && /tmp/peer-venv/bin/pip '
           'install google-tunix==0.1.7; then --peer_python=/tmp/peer-venv/bin/python)')


class IdTokenizer:
  """Text is space-separated token ids, so the peer sees exactly our prompt ids."""

  def encode(self, text, **_):
    return [int(t) for t in text.split()]

  def decode(self, ids, **_):
    return " ".join(str(int(t)) for t in ids)

  def bos_id(self):
    return 0  # falsy: tunix then prepends no BOS

  def eos_id(self):
    return -1  # never sampled: every row decodes all new tokens, as in ours

  def pad_id(self):
    return 0


def bench_prompts(prompts: int, prompt_len: int, vocab: int):
  """The prompts of bench/rl_step.py: ids in [4, vocab), generator seed 0."""
  rng = np.random.default_rng(0)
  return rng.integers(4, vocab, (prompts, prompt_len)).astype(np.int32)


def shape_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """The step's shape and settings, the same flags for ours and the peer."""
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--group", type=int, default=4)
  ap.add_argument("--prompt_len", type=int, default=256)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--beta", type=float, default=0.04)
  ap.add_argument("--lr", type=float, default=1e-5)
  ap.add_argument("--host_devices", type=int, default=os.cpu_count() or 1,
                  help="on a CPU host, JAX devices to split it into (one per core: the "
                       "batch is sharded over them); set before JAX starts")
  return ap


def use_host_devices(argv) -> int:
  """Sets XLA's host device count from --host_devices in argv; call before importing JAX.

  On a CPU, XLA runs one program on all cores by splitting each op between threads; a
  decode step's ops are too small for that to pay (one core or two take the same time).
  One device per core with the batch sharded over them keeps every core busy."""
  n = shape_args(argparse.ArgumentParser(add_help=False)).parse_known_args(argv)[0].host_devices
  if n < 1:
    raise SystemExit(f"--host_devices must be >= 1, got {n}")
  # deepimagine_jax.sharding.with_host_devices's rule, written here: the peer's interpreter
  # imports nothing of deepimagine_jax.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count=")]
  os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
  return n


def main():
  use_host_devices(sys.argv[1:])
  args = shape_args(argparse.ArgumentParser()).parse_args()
  try:
    import jax
    import optax
    from flax import nnx
    from tunix.models.qwen3 import model as qwen3
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout
  except ImportError as e:
    print(json.dumps({"error": f"{INSTALL} ({e})"}))
    return

  # The `small` Qwen3 shape of deepimagine_jax.config.ModelConfig.small().
  vocab = 8000
  cfg = qwen3.ModelConfig(num_layers=4, vocab_size=vocab, embed_dim=256, hidden_dim=768,
                          num_heads=4, head_dim=64, num_kv_heads=2, rope_theta=1_000_000,
                          norm_eps=1e-6, use_tied_embedding=True)
  # As tunix's examples: (fsdp, tp); every device on fsdp (the batch and weights split).
  mesh = jax.make_mesh((jax.device_count(), 1), ("fsdp", "tp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    reference = qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(reference)
    actor = nnx.merge(graphdef, jax.tree.map(lambda x: x.copy(), params))
  steps = args.steps + 2  # step 0's rollout and update compile (the first gap holds the latter)
  ckpt = tempfile.mkdtemp(prefix="peer_tunix_")
  cluster_config = rl_cluster_lib.ClusterConfig(
      role_to_mesh={r: mesh for r in (rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.REFERENCE,
                                      rl_cluster_lib.Role.ROLLOUT)},
      rollout_engine="vanilla",
      offload_to_cpu=False,
      training_config=rl_cluster_lib.RLTrainingConfig(
          actor_optimizer=optax.adamw(args.lr), eval_every_n_steps=10_000, max_steps=steps,
          checkpoint_root_directory=ckpt),
      rollout_config=base_rollout.RolloutConfig(
          max_tokens_to_generate=args.new, max_prompt_length=args.prompt_len,
          kv_cache_size=args.prompt_len + args.new + 8, temperature=1.0, top_p=1.0,
          top_k=None, eos_tokens=[-1]),
  )
  cluster = rl_cluster_lib.RLCluster(actor=actor, reference=reference,
                                     tokenizer=IdTokenizer(), cluster_config=cluster_config)
  stamps = []

  def reward(prompts, completions, **_):
    stamps.append(time.perf_counter())
    return [float(len(c) % 2) for c in completions]  # cheap, as our bench's grading is

  algo = grpo_learner.GRPOConfig(num_generations=args.group, num_iterations=1, beta=args.beta,
                                 epsilon=0.2, loss_agg_mode="token-mean")
  learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo, reward_fns=[reward])
  prompt_ids = bench_prompts(args.prompts, args.prompt_len, vocab)
  texts = [" ".join(map(str, row)) for row in prompt_ids.tolist()]
  learner.train([{"prompts": np.array(texts)}] * steps)
  gaps = np.diff(stamps)[1:].tolist()
  print(json.dumps({"s_per_step": statistics.median(gaps), "steps": len(gaps),
                    "devices": jax.device_count()}))


if __name__ == "__main__":
  main()
