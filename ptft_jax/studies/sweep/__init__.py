"""`ptft sweep`: hyperparameter search. space.py reads the search space, study.py runs the
trials against an Optuna study, report.py writes the table, best config and plots."""
