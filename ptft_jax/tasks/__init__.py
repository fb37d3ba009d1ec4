"""Tasks: what varies between training jobs (see tasks/base.py). The loop is one."""
