"""Benchmarks (run from the repository root as modules: ``python -m bench.<name>``) and the yardstick
they and the tests share.

A package, so benchmarks and tests import ``bench.*`` and ``rag_hpc`` alike, with no path edits.
"""
