"""Benchmarks for uhc_fast: the runner (``python -m benchmarks.run``), peers, and a pytest-benchmark suite.

Not part of the installed package; see ``benchmarks/README.md``.
"""
