"""Benchmark scripts (run from the repository root with ``PYTHONPATH=.``); their timing harness is harness.py."""
