"""Benchmarks for taskledger: ``python -m bench [NAME] [OPTIONS]`` (bench/__main__.py);
each prints a table against a baseline in the same run (docs/performance.md)."""
