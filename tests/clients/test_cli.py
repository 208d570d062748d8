"""The `loramux` command line (loramux.client.cli) against a real server: in-process main(), and subprocesses."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loramux.client.cli import main
from loramux.core import AdapterSelection, GenerationRequest, TokenDelta

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
ROOT = Path(__file__).resolve().parents[2]


def cli(server, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["--target", server.target, "--timeout", "30", *args], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def reference_text(engine, prompt: str, adapter: str, n: int) -> str:
    choice = adapter or AdapterSelection.BASE
    request = GenerationRequest(prompt=prompt, adapter=choice, max_new_tokens=n, ignore_eos=True)
    return "".join(e.text for e in engine.submit(request) if isinstance(e, TokenDelta))


def test_generate_streams_to_stdout(server):
    code, out, err = cli(server, "generate", "--adapter", "math", "--max-new-tokens", "8", "--ignore-eos", "Prove that")
    assert code == 0
    assert out == reference_text(server.engine, "Prove that", "math", 8) + "\n"
    assert "[length; adapter math v1; prompt" in err and "completion 8 tokens" in err


def test_adapters_commands(server, adapter_dirs):
    code, out, _ = cli(server, "adapters", "load", "extra", str(adapter_dirs["poet"]), "--pinned")
    assert code == 0 and out == "loaded: extra (rank 8, v1)\n"
    code, out, _ = cli(server, "adapters", "set", "extra")
    assert code == 0 and out == "default adapter: extra (was (base model))\n"
    code, out, _ = cli(server, "adapters", "list")
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["NAME", "RANK"] and [line.split()[0] for line in lines[1:4]] == [
        "extra",
        "math",
        "poet",
    ]
    assert lines[-1] == "default adapter: extra"
    code, out, _ = cli(server, "adapters", "get", "math")
    assert code == 0 and 'name: "math"' in out
    code, out, _ = cli(server, "adapters", "set", "--base")
    assert out == "default adapter: (base model) (was extra)\n"
    code, out, _ = cli(server, "adapters", "unload", "extra")
    assert code == 0 and out == "unloaded: extra\n"
    code, out, _ = cli(server, "adapters", "unload", "extra", "--allow-missing")
    assert code == 0 and out == "not loaded: extra\n"
    code, out, _ = cli(server, "health")
    assert out == "SERVING\n"


def test_errors_exit_1_with_details(server):
    code, _, err = cli(server, "adapters", "unload", "nope")
    assert code == 1 and err.startswith("error: NOT_FOUND ADAPTER_NOT_FOUND: ")
    code, _, err = cli(server, "generate", "--top-p", "3", "hi")
    assert code == 1 and "sampling.top_p:" in err


@pytest.mark.parametrize("command", [["loramux"], ["python", "-m", "loramux.client"]])
def test_cli_subprocess(server, command, tmp_path):
    """The `loramux` console script and `python -m loramux.client`, run outside the checkout."""
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "LORAMUX_TARGET": server.target}
    executable = str(Path(sys.executable).parent / command[0])
    cmd = [executable, *command[1:], "generate", "--base", "--max-new-tokens", "6", "--ignore-eos", "Prove"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == reference_text(server.engine, "Prove", "", 6) + "\n"
