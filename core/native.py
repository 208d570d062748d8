"""Native kernels (C, in the package) built with the machine's C compiler at engine start, and loaded.

The source is compiled once per machine with ``-O3 -march=native -fopenmp`` into a per-user cache
(``~/.cache/loramux/native``, keyed by the source, the flags, the compiler's version and the CPU's model and
flags, so a home shared between different CPUs never loads code built for another), and loaded with ctypes
*after* torch: its OpenMP symbols then bind to the libgomp torch already loaded, one thread pool for both (a
second pool halved the grouped-LoRA route's speed, BENCHMARKS "Session 18"). The kernels that use this
(lora/native_kernel.py, model/native_linear.py) check their library against torch before they run it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

# 512-bit vectors where the CPU has them: gcc's default for AVX-512 CPUs is 256-bit, which also spilled the
# grouped kernel's accumulators to the stack (3x slower); a CPU without AVX-512 ignores the preference
FLAGS: Final = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-shared", "-fPIC")
COMPILE_SECONDS: Final = 120.0
_QUOTED_INCLUDE: Final = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


class NativeKernelUnavailable(RuntimeError):
    """A native kernel cannot run on this machine (the message says why)."""


def load_library(source: Path, *, cache_dir: Path | None = None) -> tuple[ctypes.PyDLL, Path]:
    """The library built from ``source`` (built now unless this machine's build is cached) and its path."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise NativeKernelUnavailable("no C compiler (gcc or cc) on PATH")
    if not source.is_file():
        raise NativeKernelUnavailable(f"kernel source {source} is missing from this install")
    directory = cache_dir if cache_dir is not None else Path.home() / ".cache" / "loramux" / "native"
    path = directory / f"{source.stem}-{build_key(compiler, source)}.so"
    if not path.is_file():
        compile_library(compiler, source, directory, path)
    try:
        lib = ctypes.PyDLL(str(path))  # keeps the GIL: a released one is retaken only after other threads yield
    except OSError as exc:
        raise NativeKernelUnavailable(f"cannot load {path}: {exc}") from exc
    return lib, path


def build_key(compiler: str, source: Path) -> str:
    """Changes with the source (and the files it includes), the flags, the compiler's version and this CPU
    (model and feature flags)."""
    digest = hashlib.sha256()
    for part in sources_of(source):
        digest.update(part.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=False)
    digest.update(version.stdout.encode())
    digest.update(platform.machine().encode())
    digest.update(cpu_identity().encode())
    return digest.hexdigest()[:16]


def sources_of(source: Path) -> list[Path]:
    """source and the files it includes with ``#include "name"`` (beside it), each once, depth first."""
    found: list[Path] = []
    pending = [source]
    while pending:
        path = pending.pop()
        if path in found or not path.is_file():
            continue
        found.append(path)
        pending.extend(path.parent / name for name in reversed(_QUOTED_INCLUDE.findall(path.read_text())))
    return found


def cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(keep))  # one of each: every core repeats them


def compile_library(compiler: str, source: Path, directory: Path, path: Path) -> None:
    """Compile into a temporary file beside ``path`` and rename it into place: two processes building at once
    each load a whole library, never a half-written one."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise NativeKernelUnavailable(f"cannot create the kernel cache {directory}: {exc}") from exc
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, "-o", tmp, str(source)],
            capture_output=True,
            text=True,
            timeout=COMPILE_SECONDS,
            check=False,
        )
        if done.returncode != 0:
            raise NativeKernelUnavailable(f"{compiler} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    except subprocess.TimeoutExpired as exc:
        raise NativeKernelUnavailable(f"{compiler} took over {COMPILE_SECONDS:.0f} s") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built the native kernel %s: %s", source.name, path)


class NativeLora(ctypes.Structure):
    """One module's LoRA add as one native library hands it to another (decode_layer.c's lora_t): the grouped
    kernel's ``lora_grouped_add`` and its segment arguments, for the native decode layers to call right after
    that module's GEMM. Its addresses point into tensors the route that made it holds."""

    _fields_ = [
        ("add", ctypes.c_void_p),
        *((name, ctypes.c_void_p) for name in ("a_ptrs", "b_ptrs", "ranks", "scales", "rows", "offsets")),
        ("adapters", ctypes.c_int64),
        ("scratch", ctypes.c_void_p),
        ("scratch_stride", ctypes.c_int64),
    ]
