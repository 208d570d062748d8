"""Adapters: what one is (``spec``, ``targeting``, ``adapter``), what it may be called (``names``), how it
arrives (``sources``, ``loading``), when it leaves (``eviction``), and the ``manager`` that holds them;
``export`` writes PEFT folders. Builds on ``loramux.core.lora``; never imports the engine.
"""
