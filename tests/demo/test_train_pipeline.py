"""`make demo-assets` end to end, with a handful of steps: the recipe still runs and writes loadable assets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from loramux.core import AdapterManager

REPO = Path(__file__).resolve().parents[2]


def test_demo_train_writes_loadable_assets(tmp_path):
    out = tmp_path / "assets"
    cmd = [sys.executable, "-m", "loramux.demo.train", "--out", str(out), "--base-steps", "3", "--adapter-steps", "2"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=300)
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert tokenizer.decode(tokenizer("If the file")["input_ids"], skip_special_tokens=True) == "If the file"
    manager = AdapterManager(model)
    names = sorted(p.name for p in (out / "adapters").iterdir())
    assert names == ["reverse", "rot13", "upper"]
    for name in names:
        assert not manager.load_adapter(str(out / "adapters" / name), name).missing_keys
    assert (out / "manifest.json").is_file()
