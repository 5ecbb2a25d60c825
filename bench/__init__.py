"""Benchmarks for taskledger: ``python -m bench [NAME] [OPTIONS]`` (see bench/__main__.py).

Each prints a markdown table that compares against its baseline in the same run, and
keeps the raw figures as JSON under ``bench/results/`` (gitignored).
"""
