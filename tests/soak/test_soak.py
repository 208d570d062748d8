"""The soak (driver.py) against a real server process: 60 s on the tiny test model in `make test`;
`make soak` runs it for 10 minutes on the bench's model (LORAMUX_SOAK_SECONDS, LORAMUX_SOAK_MODEL=bench)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.soak.driver import soak

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
ROOT = Path(__file__).resolve().parents[2]


def bench_model(folder: Path) -> tuple[Path, Path]:
    """The bench's Llama-shaped model, tokenizer and one r=16 adapter, saved once under build/soak."""
    from bench.common import bpe_tokenizer, llama_512, make_adapters

    model, adapter = folder / "model", folder / "adapters" / "adapter0"
    if not (model / "config.json").is_file():
        base = llama_512()
        base.save_pretrained(model)
        bpe_tokenizer(8192).save_pretrained(model)
        make_adapters(base, folder / "adapters", count=1)
    return model, adapter


def test_soak(model_dir, adapter_dirs, tmp_path):
    seconds = float(os.environ.get("LORAMUX_SOAK_SECONDS", "60"))
    if os.environ.get("LORAMUX_SOAK_MODEL") == "bench":
        model, template = bench_model(ROOT / "build" / "soak")
    else:
        model, template = model_dir, adapter_dirs["math"]
    report = soak(model=model, template=template, workdir=tmp_path, seconds=seconds)
    print("\n" + report.summary())
    assert not report.problems(), report.summary()
    assert sum(report.calls.values()) > 0 and report.calls[("stream", "OK")] > 0
