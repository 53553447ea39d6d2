"""Experiments built on federated runs: compare (every rule, one-shot and multi-round), sweeps,
plots, the merge demo.
"""
