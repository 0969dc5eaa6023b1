"""Test setup: makes ``tests/`` importable as a package root for the shared helpers."""
