"""Benchmarks: each module is one command that prints a table and appends it to docs/benchmarks.md."""
