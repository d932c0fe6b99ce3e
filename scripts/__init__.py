"""The project's developer scripts, not installed.

A regular package, so ``python -m scripts.benchmarks`` (what scripts/bench runs) finds this
tree's, not some other ``scripts`` package an installed distribution may ship.
"""
