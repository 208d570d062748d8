"""The embedded default: a small Llama trained on Python's docstrings, and LoRA adapters with visible effects.

``make demo-assets`` (python -m loramux.demo.train) rebuilds everything under demo/assets/; ``make demo``
(python -m loramux.demo.show) streams one prompt through the base model and every adapter in one batch.
"""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
MODEL_DIR = ASSETS_DIR / "model"  # config.json, model.safetensors, tokenizer.json, ...
ADAPTERS_DIR = ASSETS_DIR / "adapters"  # one PEFT adapter folder per adapter name
ADAPTER_NAMES = ("upper", "rot13", "reverse")
DEMO_PROMPT = "If the file"
