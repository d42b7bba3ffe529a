"""Benchmarks and demos, run from the repository root as `python -m benchmarks.NAME`
(see benchmarks/README.md); shared pieces are imported as `benchmarks.NAME`."""
