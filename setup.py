"""Installs deepimagine_jax (model, training, RL, eval) and data_pipeline."""
from setuptools import find_packages, setup

setup(
    name="deepimagine-jax",
    version="0.1.0",
    description="Counterfactual imagining for clinical-trial outcome prediction, in JAX.",
    python_requires=">=3.11",
    packages=find_packages(include=["deepimagine_jax*", "data_pipeline*", "configs"]),
    package_data={"data_pipeline": ["tfds_pairs/*", "embedded/*"]},  # embedded: the CT.gov sample
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "sentencepiece>=0.2.0",
        "tokenizers>=0.20",  # tokenizer.json of Qwen3 / Llama-3 checkpoints
        "jinja2>=3.1.6",  # chat templates, rendered as transformers renders them
        "ml-collections>=1.1.0",
        "tensorflow-datasets>=4.9.10",
        "importlib_resources>=6.0",  # TFDS needs it without TensorFlow installed
        "absl-py>=2.1",
        "numpy>=1.26",
        "scikit-learn>=1.5",
        "scipy>=1.11",  # sparse features of the baselines; the trial world's Welch tests
        "safetensors>=0.4",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
        "httpx>=0.27",  # ClinicalTrials.gov API v2 client (timeouts, one connection pool)
        "tenacity>=8.2",  # its retries: jittered exponential back-off on 429 / 5xx / timeouts
        # (both also serve the teacher client of deepimagine_jax/teacher.py)
        "starlette>=0.40",  # the policy's OpenAI-compatible endpoint (deepimagine_jax/serve.py)
        "uvicorn>=0.30",  # the ASGI server that runs it
        "tqdm>=4.66",  # the teacher client's progress bar (rate, ETA)
    ],
    extras_require={
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",  # pytest.ini runs the suite on 2 workers (one per core)
            "hypothesis>=6.100",
            "torch==2.13.0",  # CPU wheel; only a test-time reference
            "transformers>=4.50",
            "peft>=0.21",  # LoRA export parity: peft loads our adapter onto the HF model
        ],
        # bench/rl_step.py --peer=tunix: google-tunix's GRPO learner on the same shape. It
        # upgrades transformers / tokenizers / safetensors, so a separate venv is safer:
        # python -m venv --system-site-packages /tmp/peer-venv &&
        # /tmp/peer-venv/bin/pip install google-tunix==0.1.7
        "peer": ["google-tunix==0.1.7"],
    },
)
