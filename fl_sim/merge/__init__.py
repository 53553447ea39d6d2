"""Offline merging of real fine-tuned checkpoints (`fl-sim merge`): options, mergekit-style YAML,
PEFT LoRA adapters as inputs (``adapters``) and as output (``to_adapter``), the merge run.
"""
