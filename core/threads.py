"""The OpenMP worker threads behind torch's CPU ops, per calling thread.

Each thread that runs a parallel torch op becomes the master of an OpenMP pool of its own, and keeps its
workers (parked) until it ends. libgomp counts every pool's workers: once they outnumber the CPUs, all
pools stop spin-waiting between parallel regions and park on a futex at once, so each of the engine's
hundreds of small ops a step waits for its workers to be woken. On 2 cores a second live pool made small
LoRA matmuls 4-7x slower and a GEMM-plus-LoRA loop 1.8x slower (BENCHMARKS.md), and it skewed what
``--linear-kernel auto`` and ``--lora-kernel auto`` measure at engine start: the thread that builds the
engine has usually run torch ops (loading the model) and waits, pool intact, while the engine thread times.

``release_thread_pool`` gives the calling thread's workers back (OpenMP 5.0 ``omp_pause_resource_all``;
libgomp frees the caller's pool); the next parallel op on that thread starts new ones. A thread that is
about to wait a long time calls it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: threads end, the runtime stays initialised
RUNTIMES = ("libgomp", "libomp", "libiomp")  # GNU (torch's Linux wheels), LLVM, Intel


def release_thread_pool() -> bool:
    """Give back the calling thread's OpenMP workers (none: a no-op). False when no OpenMP runtime is loaded
    or it refused (called inside a parallel region)."""
    pause = _pause_function()
    return pause is not None and pause(OMP_PAUSE_SOFT) == 0


@functools.cache
def _pause_function() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    path = loaded_runtime()
    if path is None:
        return None
    try:
        pause = ctypes.CDLL(str(path)).omp_pause_resource_all  # already loaded: dlopen returns that copy
    except (OSError, AttributeError) as exc:  # an OpenMP before 5.0
        log.debug("OpenMP runtime %s has no omp_pause_resource_all: %s", path, exc)
        return None
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause


def loaded_runtime(maps: Path = Path("/proc/self/maps")) -> Path | None:
    """The OpenMP runtime this process has loaded (the one torch uses), from the memory map; None if none
    is, or the map is not readable (not Linux)."""
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(maxsplit=5)  # address, perms, offset, device, inode[, path]
        path = fields[5].strip() if len(fields) == 6 else ""
        name = os.path.basename(path)
        if name.startswith(RUNTIMES) and ".so" in name:
            return Path(path)
    return None
