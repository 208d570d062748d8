"""LoRA math: adapter tensors (``weights``), per-row routing plans (``routing``), wrapped modules (``layers``).

Knows nothing of files, names or lifecycles; imports only ``loramux.core.errors`` from the rest of core.
"""
