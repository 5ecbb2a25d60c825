"""Benchmarks for taskledger, run against a real PostgreSQL server.

Each benchmark module exposes ``NAME``, a one-line ``SUMMARY`` and ``main(argv) -> int``;
``python -m bench`` runs them all (or one, with ``--only NAME``). Every run creates its own
throwaway database on the server it is given and drops it afterwards, prints a markdown
table to stdout and keeps the raw figures as JSON under ``bench/results/`` (gitignored).
"""
