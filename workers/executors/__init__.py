"""Executors by language (python, csharp, echo) and the sandbox they run programs in."""
