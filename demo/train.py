"""`make demo-assets`: rebuild demo/assets/ from the Python standard library's docstrings, on the CPU.

    python -m loramux.demo.train [--out demo/assets] [--threads N] [--base-steps N] [--adapter-steps N]

Steps: corpus (docstrings via ast) -> byte-level BPE tokenizer -> base Llama -> saved (fp16 weights) ->
loaded back like any Hub model -> three LoRA adapters trained in one mixed batch through loramux -> exported
in PEFT's format -> manifest.json (recipes, losses, timings, corpus digest).

Seeds are fixed, so a rerun on the same machine, Python and thread count gives the same files; other CPUs,
BLAS builds or thread counts may round differently and end in slightly different weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import transformers
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from loramux.demo import ASSETS_DIR
from loramux.demo.adapters import AdapterRecipe, train_adapters
from loramux.demo.base_model import (
    BaseRecipe,
    base_texts,
    llama_config,
    mean_loss,
    save_base,
    token_stream,
    train_base,
)
from loramux.demo.corpus import corpus_digest, stdlib_docstrings
from loramux.demo.tokenizer import train_tokenizer

_HELD_OUT_EVERY = 50  # every 50th docstring is kept out of training, to measure the base's loss honestly


Losses = dict[str, list[float]]


def _progress(total: int, desc: str) -> tuple[tqdm, Callable[[int, Mapping[str, float]], None], Losses]:
    """A progress bar showing the recent mean of every loss, and the history of each."""
    bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
    history: Losses = {}

    def on_step(step: int, losses: Mapping[str, float]) -> None:
        for name, value in losses.items():
            history.setdefault(name, []).append(value)
        bar.set_postfix({k: f"{_tail_mean(v):.3f}" for k, v in history.items()}, refresh=False)
        bar.update(1)

    return bar, on_step, history


def _tail_mean(losses: Sequence[float], n: int = 20) -> float:
    tail = list(losses[-n:])
    return round(sum(tail) / len(tail), 4) if tail else float("nan")


def build(*, out: Path, base: BaseRecipe, adapters: AdapterRecipe) -> dict:
    started = time.perf_counter()
    model_dir, adapters_dir = out / "model", out / "adapters"
    for folder in (model_dir, adapters_dir):
        shutil.rmtree(folder, ignore_errors=True)

    docs = stdlib_docstrings()
    held_out = docs[::_HELD_OUT_EVERY]
    train_docs = [d for i, d in enumerate(docs) if i % _HELD_OUT_EVERY]
    texts = base_texts(train_docs, recipe=base)
    tokenizer = train_tokenizer(texts, vocab_size=base.vocab)
    stream = token_stream(texts, tokenizer)
    print(f"corpus: {len(docs)} docstrings, {sum(map(len, docs)):,} characters; {len(stream):,} training tokens")
    timings = {"corpus_and_tokenizer_s": time.perf_counter() - started}

    mark = time.perf_counter()
    bar, on_step, base_losses = _progress(base.steps, "base model")
    model = train_base(stream, config=llama_config(base, tokenizer), recipe=base, on_step=on_step)
    bar.close()
    save_base(model, model_dir, tokenizer)
    timings["base_s"] = time.perf_counter() - mark

    # Train the adapters on the base exactly as it ships (fp16 weights read back as fp32).
    mark = time.perf_counter()
    shipped = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    held_out_loss = mean_loss(shipped, token_stream(held_out, loaded_tokenizer), context=base.context)
    bar, on_step, adapter_losses = _progress(adapters.steps, "adapters, one mixed batch")
    train_adapters(
        shipped,
        loaded_tokenizer,
        train_docs,
        out_dir=adapters_dir,
        recipe=adapters,
        base_model_name_or_path="demo/assets/model",
        on_step=on_step,
    )
    bar.close()
    timings["adapters_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - started

    manifest = {
        "command": "make demo-assets",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "corpus": {"docstrings": len(docs), "characters": sum(map(len, docs)), "sha256_16": corpus_digest(docs)},
        "base": {
            "recipe": dataclasses.asdict(base),
            "train_loss_last20": _tail_mean(base_losses["loss"]),
            "held_out_loss": round(held_out_loss, 4),
        },
        "adapters": {
            "recipe": dataclasses.asdict(adapters),
            "train_loss_last20": {name: _tail_mean(v) for name, v in adapter_losses.items()},
        },
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "bytes": {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSETS_DIR)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--base-steps", type=int, default=BaseRecipe.steps)
    parser.add_argument("--adapter-steps", type=int, default=AdapterRecipe.steps)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    manifest = build(
        out=args.out,
        base=BaseRecipe(steps=args.base_steps),
        adapters=AdapterRecipe(steps=args.adapter_steps),
    )
    total = sum(manifest["bytes"].values())
    print(f"done in {manifest['seconds']['total_s']:.0f} s; {total / 1e6:.1f} MB in {args.out}")
    print(json.dumps({k: manifest[k] for k in ("base", "adapters", "seconds")}, indent=2))


if __name__ == "__main__":
    main()
