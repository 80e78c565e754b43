"""Benchmarks (run as scripts: ``python bench/<name>.py``) and the yardstick they and the tests share.

A package so that tests, run from the repository root, can ``from bench.yardstick ... import``.
"""
