"""Benchmark suites (`embedstore bench SUITE.toml`): many models x datasets x protocols from the stored
vectors, each cell cached under a key of what its numbers depend on, one leaderboard at the end.

suite.py reads the TOML, cells.py runs and caches one cell through the eval code the commands use,
run.py runs the missing cells in parallel, leaderboard.py writes the tables and plots.
"""
