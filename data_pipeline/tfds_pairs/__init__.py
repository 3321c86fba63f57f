"""TFDS builder for example records (its own package: TFDS lists the builder's folder)."""
from data_pipeline.tfds_pairs.deepimagine_pairs import (  # noqa: F401
    DeepimaginePairs, build_tfds, load_tfds_source, validate_record)
