"""Benchmarks: figures printed and written as JSON, never asserted (run with `python -m tests.bench`)."""
