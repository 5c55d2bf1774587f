"""Benchmarks are not part of the default test run: ``python -m pytest tests/benchmarks`` runs them."""
