"""Runs of many runs: sweep/ (`ptft sweep`, hyperparameter search) and experiment.py
(`ptft experiment pretrain-vs-end-to-end`)."""
