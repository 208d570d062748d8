"""The two distributions as users get them: wheels built from this checkout, installed into fresh venvs.

* Both wheels hold only the ``loramux`` namespace (top_level.txt and the file list).
* ``loramux-client`` installs into an empty venv without torch or transformers, and both its sync and its
  asyncio client stream from a live server.
* ``loramux-server`` from the installed (non-editable) server wheel, started with no arguments outside the
  checkout, serves the embedded demo model and its adapters from site-packages.

The client venv installs the wheel's dependencies from the package index, as a caller would. The server venv
installs both wheels without dependencies and borrows torch, transformers and grpc from this environment
through a plain path entry (not a site dir: this environment's editable-install finders are not loaded).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from loramux.core import GenerationRequest, TokenDelta

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, **kwargs)
    assert done.returncode == 0, f"{cmd}\n{done.stdout}\n{done.stderr}"
    return done


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


# What each distribution is built from, copied first: setuptools keeps build/ between builds in the source tree,
# where a module deleted since the last build would still end up in the wheel.
SOURCES = {
    "clients": ["pyproject.toml", "loramux"],
    ".": ["pyproject.toml", "README.md", "core", "service", "demo", "deploy"],
}
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out, work = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("sources")
    for project, parts in SOURCES.items():
        copy = work / project.strip(".") / "project"
        for part in parts:
            source = ROOT / project / part
            if source.is_dir():
                shutil.copytree(source, copy / part, ignore=IGNORED)
            else:
                copy.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, copy / part)
        pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        _run([*pip_wheel, "-w", str(out), str(copy)])
    found = {w.name.split("-")[0]: w for w in out.glob("*.whl")}
    assert set(found) == {"loramux", "loramux_client"}, found
    return found


def _new_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin" / "python"


@pytest.mark.parametrize("dist", ["loramux", "loramux_client"])
def test_each_wheel_holds_only_the_loramux_namespace(wheels: dict[str, Path], dist: str) -> None:
    with zipfile.ZipFile(wheels[dist]) as wheel:
        names = wheel.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert wheel.read(top_level).decode().split() == ["loramux"]
    outside = [n for n in names if not n.startswith("loramux/") and ".dist-info/" not in n]
    assert not outside
    assert "loramux/__init__.py" not in names  # a namespace both distributions share
    if dist == "loramux":
        assert "loramux/demo/assets/model/model.safetensors" in names
        assert "loramux/demo/assets/adapters/upper/adapter_config.json" in names
        assert "loramux/core/lora/native/grouped_lora.c" in names  # built on the serving machine
    else:
        assert "loramux/v1/generation_service_pb2.pyi" in names and "loramux/client/py.typed" in names


CLIENT_SCRIPT = """
import asyncio, json, sys
from loramux.client import AsyncLoramuxClient, LoramuxClient

target = sys.argv[1]
options = dict(adapter="math", max_new_tokens=8, ignore_eos=True)
with LoramuxClient(target, timeout=60) as client:
    sync_text = "".join(client.generate("Prove that", **options))

async def main():
    async with AsyncLoramuxClient(target, timeout=60) as client:
        events = [e async for e in client.generate_events("Prove that", **options)]
        adapters = [a.name for a in await client.list_adapters()]
    return "".join(getattr(e, "text", "") for e in events[:-1]), events[-1].finish_reason, adapters

async_text, reason, adapters = asyncio.run(main())
print(json.dumps({"sync": sync_text, "async": async_text, "reason": reason, "adapters": adapters}))
"""


def test_the_client_wheel_installs_without_torch_and_streams(wheels, server, tmp_path) -> None:
    python = _new_venv(tmp_path / "client-venv")
    _run([str(python), "-m", "pip", "install", "-q", str(wheels["loramux_client"])], env=_clean_env())
    installed = _run([str(python), "-m", "pip", "list", "--format=json"], env=_clean_env()).stdout
    names = {p["name"].lower() for p in json.loads(installed)}
    assert "loramux-client" in names
    assert not names & {"torch", "transformers", "safetensors", "loramux"}, names
    script = tmp_path / "stream.py"
    script.write_text(CLIENT_SCRIPT)
    done = _run([str(python), str(script), server.target], cwd=tmp_path, env=_clean_env())
    result = json.loads(done.stdout)
    request = GenerationRequest(prompt="Prove that", adapter="math", max_new_tokens=8, ignore_eos=True)
    expected = "".join(e.text for e in server.engine.submit(request) if isinstance(e, TokenDelta))
    assert result == {"sync": expected, "async": expected, "reason": "length", "adapters": ["math", "poet"]}
    assert _run([str(python.parent / "loramux"), "--help"], env=_clean_env()).stdout.startswith("usage: loramux")


def test_loramux_server_from_the_installed_wheel_serves_the_demo(wheels, tmp_path) -> None:
    python = _new_venv(tmp_path / "server-venv")
    env = _clean_env()
    for wheel in (wheels["loramux_client"], wheels["loramux"]):
        _run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], env=env)
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    (purelib / "borrowed-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    where = _run([str(python), "-c", "import loramux.demo; print(loramux.demo.__file__)"], cwd=tmp_path, env=env)
    assert Path(where.stdout.strip()).is_relative_to(purelib), where.stdout
    server = python.parent / "loramux-server"
    proc = subprocess.Popen(
        [str(server), "--port", "0"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            listening = pool.submit(proc.stdout.readline).result(120)
            assert listening.startswith("loramux listening on 127.0.0.1:"), listening
            port = int(listening.strip().rsplit(":", 1)[1])
            assert pool.submit(proc.stdout.readline).result(120).strip() == "loramux ready"
        from loramux.client import LoramuxClient

        with LoramuxClient(f"127.0.0.1:{port}", timeout=60) as client:
            assert [a.name for a in client.list_adapters()] == ["reverse", "rot13", "upper"]
            assert all(Path(a.source).is_relative_to(purelib) for a in client.list_adapters())
            text = "".join(client.generate("If the file", adapter="upper", max_new_tokens=24, ignore_eos=True))
        letters = [c for c in text if c.isalpha()]
        assert letters and sum(c.isupper() for c in letters) >= 0.9 * len(letters), text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
