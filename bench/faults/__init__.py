"""The fault-injection suite: `python -m bench faults` (see bench/faults/suite.py)."""
