"""The one loop and what it calls: loop.py (the loop), step.py (the one jitted step),
engine.py (model, state and step for a config), evaluate.py (the eval pass), optim.py,
plan.py (finetuning strategies: which parameters train, at what LR), safety.py (divergence,
signals, save clock), log.py (metrics to JSONL / TensorBoard), peak.py (MFU's reference),
job.py (what a job hands the loop)."""
