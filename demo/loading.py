"""Loading the shipped demo: the base with transformers, every adapter with loramux's manager."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from loramux.core import AdapterManager
from loramux.core.adapters.sources import CONFIG_NAME
from loramux.demo import ADAPTER_NAMES, ADAPTERS_DIR, MODEL_DIR


@dataclass
class DemoModel:
    model: PreTrainedModel
    tokenizer: object  # a transformers tokenizer
    manager: AdapterManager
    adapters: tuple[str, ...]  # loaded adapter names, in display order


def adapter_folders(adapters_dir: Path = ADAPTERS_DIR) -> dict[str, Path]:
    """name -> folder for every adapter folder under adapters_dir; the demo's own names first, in order."""
    found = {p.name: p for p in adapters_dir.iterdir() if (p / CONFIG_NAME).is_file()} if adapters_dir.is_dir() else {}
    order = [n for n in ADAPTER_NAMES if n in found] + sorted(n for n in found if n not in ADAPTER_NAMES)
    return {n: found[n] for n in order}


def load_demo(*, model_dir: Path = MODEL_DIR, adapters_dir: Path = ADAPTERS_DIR) -> DemoModel:
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no demo model in {model_dir}: run `make demo-assets` to build it")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # fp32: see demo.base_model.save_base
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    manager = AdapterManager(model)
    folders = adapter_folders(adapters_dir)
    for name, folder in folders.items():
        manager.load_adapter(str(folder), name)
    return DemoModel(model=model, tokenizer=tokenizer, manager=manager, adapters=tuple(folders))
