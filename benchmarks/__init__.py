"""Benchmarks of lt-rebalance: each operation timed against its floor in the same process.

Run from the repository root::

    python -m benchmarks [--scale small|imagenet_lt|places_lt|inat2018] [--only NAME] [--json out.json]

See :mod:`benchmarks.run` for the options and :mod:`benchmarks.ops` for what is measured.
"""
