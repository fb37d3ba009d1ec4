"""`ptft sweep`: hyperparameter search. space.py reads the search space, study.py prepares the
sweep and opens the Optuna study, trials.py runs the trials (one or more workers),
report.py writes the table, best config and plots."""
