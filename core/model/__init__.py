"""The base model's pieces the engine runs: ``loader``, the growable KV cache (``kv_cache``, ``kv_batch``),
``ragged_attention`` for decode steps and the CPU ``linear_kernels``. Independent of adapters.
"""
