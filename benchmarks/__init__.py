"""Benchmarks and experiments (scripts: ``python benchmarks/<name>.py``; see benchmarks/README.md).

A package only so that tests import the reusable pieces of a script as ``from benchmarks import tune_flow``;
the scripts themselves are run by path, with this folder on ``sys.path`` (``import _common``). Not installed
with slicreg.
"""
