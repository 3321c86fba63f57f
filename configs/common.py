"""Config sections shared by the job configs. Every key is declared here once."""
import ml_collections


def model(preset: str = "small") -> ml_collections.ConfigDict:
  """`preset` picks a ModelConfig classmethod; the other keys override it."""
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.dtype = "float32"  # compute dtype; "bfloat16" on TPU/GPU
  c.param_dtype = "float32"
  c.remat = False
  # lax.scan over stacked layers (compile time flat in depth); None: the preset's choice
  # (the presets of 26+ layers scan) or, for hf_checkpoint, scan from 8 layers up.
  c.scan_layers = ml_collections.config_dict.placeholder(bool)
  c.hf_checkpoint = ""  # a Hugging Face folder (config.json + *.safetensors) to start from
  return c


def lora() -> ml_collections.ConfigDict:
  """Low-rank adapters (deepimagine_jax/lora.py); rank 0 trains the whole model, as before."""
  c = ml_collections.ConfigDict()
  c.rank = 0  # 0: no adapters; the method's recipe uses 64
  c.alpha = 16.0  # updates scale by alpha / rank (PEFT's convention)
  c.dropout = 0.0  # on the adapter input, in training only
  c.targets = ("q", "k", "v", "o", "gate", "up", "down")  # every linear projection
  c.adapters = ("default",)  # several names: one adapter per factor on one frozen base
  # "active": every example trains / is scored with adapters[0]; "factor": an example of
  # one factor named in adapters uses that adapter, the rest adapters[0] (lora.route)
  c.route = "active"
  return c


def mesh() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = -1  # -1: all devices not used by the other axes
  c.fsdp = 1
  c.tensor = 1
  # On a CPU host: split it into this many JAX devices (the batch is sharded over them).
  # XLA splits each op of a one-device program between the cores, which a small model's
  # decode steps are too small to gain from: with one device per core GRPO's sampling ran
  # 1.3x faster on 2 cores (bench/rl_step.py). 0 keeps XLA's one device (or $XLA_FLAGS').
  c.host_devices = 0
  c.multihost = False  # call jax.distributed.initialize() (TPU pods, multi-node GPU)
  # Where the processes meet; "" / -1: $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES,
  # $JAX_PROCESS_ID, else what JAX detects (Cloud TPU, SLURM, Open MPI, Kubernetes).
  c.coordinator_address = ""  # "host:port" of process 0
  c.num_processes = -1
  c.process_id = -1
  return c


def data() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.root = ""  # "" -> $DEEPIMAGINE_DATA, else ../shared/data, else download CT Open
  c.build_dir = ""  # "" -> <workdir>/data ; reused when its fingerprint matches
  c.sources = ("ct_open", "ctgov_xml", "ctgov_json")  # also: evidence_inference, synthetic
  c.seed = 0
  c.vocab_size = 8000
  c.seq_len = 512  # SFT sequence length (prompt + completion)
  c.prompt_len = 448  # RL / eval prompt length (left-padded)
  c.pack = False
  c.dev_fraction = 0.1
  c.rl_fraction = 0.1
  c.max_anchors = 3  # natural (same-trial, training-only) pairs per target and perturbation type
  c.anchors_k = 7  # retrieved anchors per target (other trials, public before its cutoff)
  c.retriever = "tfidf"  # tfidf | bm25 | dense (dense: build_dataset needs embed=...)
  c.embed_max_len = 256  # dense retriever: tokens of trial text embedded (the rest is cut, counted)
  c.embed_batch_size = 32  # dense retriever: texts per forward
  # the order of a walk's steps from anchor to target: population -> arms -> outcome -> rest
  c.factor_order = ("population", "condition", "drug", "dose", "comparator", "outcome",
                    "phase", "allocation", "masking", "country", "sample_size")
  # the paper's trial filter on registry trials (ctgov_xml / ctgov_json); drops are counted
  c.registry_randomised = True
  c.registry_min_enrollment = 50
  c.registry_results_posted = True
  # without CT Open's Summer 2025 release (offline, embedded sample): the share of registry
  # trials, those whose results were posted last, held out as eval (registry-derived questions)
  c.registry_eval_fraction = 0.2
  c.tfds = False  # also write a TFDS (ArrayRecord) copy of the examples
  return c


def optimizer(lr: float = 3e-4, steps: int = 1000, warmup: int = 50) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.learning_rate = lr
  c.warmup_steps = warmup
  c.total_steps = steps
  c.end_lr_ratio = 0.1
  c.weight_decay = 0.1
  c.b1 = 0.9
  c.b2 = 0.95
  c.eps = 1e-8
  c.grad_clip_norm = 1.0
  c.grad_accum_steps = 1
  return c


def sft(steps: int = 300, batch: int = 16) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.steps = steps
  c.global_batch_size = batch
  c.checkpoint_every = 100
  c.keep_checkpoints = 3
  c.log_every = 10
  c.resume = True
  c.kinds = ("question", "natural_pair")  # which example kinds train the SFT stage
  c.traces = ()  # trace files (configs/traces.py): completions become reasoning + DECISION
  c.trace_order = "reasoning_first"  # or "decision_first"
  c.imagined = ()  # imagined_step example files (configs/traces.py:imagine), added to SFT
  c.optimizer = optimizer(lr=1e-3, steps=steps, warmup=min(20, steps))
  return c


def eval_() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "score"  # "score": option probabilities from logits; "sample": n sampled runs
  c.runs = 3  # sampling runs averaged (mode "sample")
  c.temperature = 0.7
  c.max_new_tokens = 24
  c.batch_size = 32
  c.max_questions = 0  # 0 = all
  c.imagining = True  # also successive imagining over retrieved anchors
  c.imagining_k = 7  # anchors walked per target (the method uses 7; <= data.anchors_k)
  c.aggregate = "mean"  # how the k anchors' final distributions combine: mean | geometric
  # What a walk carries: "decision" (the option sentence chosen at each step) or "per_arm"
  # (the two arms' values, written by the model at each step in max_new_tokens tokens,
  # then compared; train with sft.kinds including arm_estimate and arm_compare)
  c.walk = "decision"
  c.baselines = True
  c.rf_seeds = (0, 1, 2)
  c.cv_folds = 5  # baselines: hyper-parameters by k-fold CV on the training split (grouped by trial)
  c.pair_eval = True  # also the eval split's counterfactual pairs ("pairs/" results)
  c.max_pairs = 300  # pairs the model scores, evenly spread (0 = all); baselines use all
  c.checkpoint = ""  # eval job: a finished run's workdir, whose exported policy/ is evaluated
  c.traces = ()  # trace files (JSON lines: teacher / self-generated) shown beside the answers
  return c


def serve() -> ml_collections.ConfigDict:
  """The policy behind an OpenAI-compatible endpoint (deepimagine_jax/serve.py)."""
  c = ml_collections.ConfigDict()
  c.checkpoint = ""  # a finished run's workdir; its policy/ is served
  c.host = "127.0.0.1"
  c.port = 8000
  c.model_name = "deepimagine-policy"
  c.dtype = "float32"
  c.batch_size = 8  # most rows per sampler call (requests x n), padded to a power of two
  c.batch_wait_ms = 5.0  # the first queued request waits this long for company
  c.prompt_len = 448  # longer prompts are refused (400), never cut
  c.max_new_tokens = 256  # the largest max_tokens a request may ask for
  c.cache_dtype = "float32"
  return c


def teacher() -> ml_collections.ConfigDict:
  """Any OpenAI-compatible chat-completions endpoint (deepimagine_jax/teacher.py)."""
  c = ml_collections.ConfigDict()
  c.base_url = "http://127.0.0.1:8000/v1"
  c.model = "deepimagine-policy"
  c.api_key_env = "OPENAI_API_KEY"  # read from the environment at run time, never stored
  c.max_concurrency = 8
  c.max_attempts = 6  # 5 retries on 429 / 5xx / timeouts / connection errors
  c.backoff_s = 1.0  # doubles per retry, jittered
  c.backoff_max_s = 30.0
  c.timeout_s = 120.0
  c.temperature = 0.7
  c.top_p = 1.0
  c.max_tokens = 512
  # Appended to each example's prompt on a new line ("" sends the bare prompt).
  c.instruction = ("Before the DECISION line, reason step by step: how does each difference "
                   "from the known result move this outcome?")
  return c


def traces() -> ml_collections.ConfigDict:
  """Reasoning traces: who writes them, for which examples, how SFT uses them."""
  c = ml_collections.ConfigDict()
  c.source = "teacher"  # or "self": rejection sampling from a run's own policy
  c.splits = ("train",)
  c.kinds = ("question", "natural_pair")
  c.max_examples = 0  # 0 = all
  c.path = ""  # "" -> <workdir>/traces.jsonl
  c.order = "reasoning_first"  # SFT completion: reasoning then DECISION (or decision_first)
  c.self_checkpoint = ""  # source "self": the run whose policy samples
  c.self_samples = 8  # n samples per example
  c.self_keep = 2  # at most m right ones kept per example
  c.self_temperature = 1.0
  c.self_max_new_tokens = 256
  c.self_batch = 8  # prompts per sampler call
  return c
