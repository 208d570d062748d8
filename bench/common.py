"""Shared set-up of the benchmarks: the Llama-shaped model of the issues and PEFT-format adapters."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_ADAPTERS = 8


def llama_512(*, max_positions: int = 512) -> LlamaForCausalLM:
    """Hidden 512, 8 layers, vocab 8192, random weights (seeded; the same whatever ``max_positions``)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=max_positions,
    )
    return LlamaForCausalLM(config).eval()


def make_adapters(base: LlamaForCausalLM, folder: Path, count: int = N_ADAPTERS) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    paths = []
    for i in range(count):
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(
            copy.deepcopy(base),
            LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS, init_lora_weights=False),
        )
        # init_lora_weights=False gives B a real value too; scale it down to a realistic delta
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.01)
        paths.append(folder / f"adapter{i}")
        peft_model.save_pretrained(paths[-1])
    return paths


def median_time(fn: Callable[[], object], *, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def clone_adapters(template: Path, folder: Path, count: int) -> list[Path]:
    """``count`` adapters with the template's config and keys but their own random weights (fast: no peft)."""
    state = load_file(str(template / "adapter_model.safetensors"))
    config = (template / "adapter_config.json").read_text()
    paths = []
    generator = torch.Generator().manual_seed(7)
    for i in range(count):
        path = folder / f"clone{i}"
        path.mkdir(parents=True)
        (path / "adapter_config.json").write_text(config)
        tensors = {k: torch.randn(v.shape, generator=generator) * float(v.std()) for k, v in state.items()}
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        paths.append(path)
    return paths


def stdlib_text(max_bytes: int = 4_000_000) -> list[str]:
    """Text that is on every machine: Python's own standard library sources."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def bpe_tokenizer(vocab_size: int):  # -> PreTrainedTokenizerFast
    """The demo's byte-level BPE recipe (demo/tokenizer.py), trained here on stdlib text (no downloads)."""
    from loramux.demo.tokenizer import train_tokenizer

    return train_tokenizer(stdlib_text(), vocab_size=vocab_size)


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it ("?" elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        return "?"
