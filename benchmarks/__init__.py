"""Benchmarks of a source checkout: the harness behind ``flow-nexus-server bench`` and the plain
baselines it runs. Not part of the installed package."""
