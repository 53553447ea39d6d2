"""Offline merging of real fine-tuned checkpoints (`fl-sim merge`): options, mergekit-style YAML,
the merge run.
"""
