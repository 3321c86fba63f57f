"""Evaluation: CT Open metrics, predictions I/O, baselines, imagining, run report."""
