"""The model's large weights moved into memory the kernel may back with 2 MiB pages (transparent huge pages).

A decode step streams every linear weight from memory once, and with 4 KiB pages that is a TLB miss, and a
page walk, every 4 KiB: the bench model's 118 MB of linear weights span 29,000 pages, far more than the TLB
holds, and the hardware prefetchers stop at each page's end. The same native kernel over the same weights on
one Intel Xeon core: 8.1 ms at one row on 4 KiB pages, 6.4 ms on 2 MiB pages; 11.8 and 10.6 ms at eight rows.
The whole decode step gains less: one row on one thread 1.03-1.09x, 8 rows 0.99-1.07x, 2 threads unchanged
(BENCHMARKS "Session 24"). Linux hands out huge pages to anonymous memory only where asked (``madvise``, the
default policy of most distributions) or everywhere (``always``); torch's allocator asks only when an
environment variable is set, which this service does not read or set. So at engine start the model's
parameters and buffers of at least ``MIN_BYTES`` are copied into one anonymous mapping advised
``MADV_HUGEPAGE``, aligned to 2 MiB, and every tensor viewing them is re-pointed at the copy: views stay views
(the fused q/k/v weight and its members' slices), Parameters stay the same objects, and the old storage is
freed. Where the policy is ``never`` the copy is skipped (``huge_page_policy``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import logging
import mmap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

HUGE_PAGE: Final = 2 << 20
MIN_BYTES: Final = 1 << 20  # smaller tensors stay where they are: a small fraction of the bytes a step reads
ALIGN: Final = 4096  # each storage's start in the mapping (a whole page: no two storages share one)
POLICY_FILE: Final = Path("/sys/kernel/mm/transparent_hugepage/enabled")


class HugePagePolicy(enum.Enum):
    """The kernel's transparent-huge-page policy for anonymous memory."""

    ALWAYS = "always"  # every large enough anonymous mapping
    MADVISE = "madvise"  # mappings advised MADV_HUGEPAGE
    NEVER = "never"
    UNKNOWN = "unknown"  # not Linux, or the file is unreadable: advise anyway (harmless where unsupported)


@dataclass(frozen=True)
class HugePageMove:
    """What ``move_to_huge_pages`` did: ``storages`` storages of ``nbytes`` bytes in total, under ``policy``."""

    policy: HugePagePolicy
    storages: int
    nbytes: int

    def describe(self) -> str:
        if not self.storages:
            return f"weights stay on their pages (transparent huge pages: {self.policy.value})"
        return (
            f"{self.nbytes / 2**20:.0f} MiB of weights ({self.storages} tensors) moved to memory advised for "
            f"huge pages (transparent huge pages: {self.policy.value})"
        )


def huge_page_policy(path: Path = POLICY_FILE) -> HugePagePolicy:
    """The policy the kernel reports (the bracketed word of ``always [madvise] never``)."""
    try:
        text = path.read_text()
    except OSError:
        return HugePagePolicy.UNKNOWN
    start, end = text.find("["), text.find("]")
    word = text[start + 1 : end] if 0 <= start < end else ""
    return next((p for p in HugePagePolicy if p.value == word), HugePagePolicy.UNKNOWN)


def move_to_huge_pages(
    modules: Iterable[nn.Module], *, policy: HugePagePolicy | None = None, min_bytes: int = MIN_BYTES
) -> HugePageMove:
    """Move the CPU storages of at least ``min_bytes`` behind ``modules``' parameters and buffers (each module's
    own, submodules included) into one mapping advised for huge pages, re-pointing every tensor found viewing
    them. The values are copied bit for bit; a tensor viewing a moved storage that is not found here keeps the
    old storage alive, with the same values."""
    policy = huge_page_policy() if policy is None else policy
    groups = _storages(modules, min_bytes=min_bytes)
    if policy is HugePagePolicy.NEVER or not groups or not hasattr(mmap, "MAP_PRIVATE"):  # (no MAP_PRIVATE: Windows)
        return HugePageMove(policy=policy, storages=0, nbytes=0)
    offsets, total, nbytes = [], 0, 0
    for storage, _ in groups:
        offsets.append(total)
        total += -(-storage.nbytes() // ALIGN) * ALIGN
        nbytes += storage.nbytes()
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS  # private: shared anonymous memory follows shmem_enabled
    region = mmap.mmap(-1, total + HUGE_PAGE, flags=flags)  # zero pages until first touched
    base = -_address(region) % HUGE_PAGE  # the first 2 MiB boundary inside the mapping
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    groups.reverse()
    for offset in offsets:  # each old storage dropped once moved: the memory peaks at one storage over, not 2x
        storage, tensors = groups.pop()
        copy = torch.frombuffer(region, dtype=torch.uint8, count=storage.nbytes(), offset=base + offset)
        _move(storage, tensors, copy)
        del storage, tensors, copy
    _trim_heap()  # the heap's share of the old storages back to the system
    return HugePageMove(policy=policy, storages=len(offsets), nbytes=nbytes)


def _move(storage: torch.UntypedStorage, tensors: list[Tensor], copy: Tensor) -> None:
    """Copy storage's bytes into ``copy`` (uint8, its size, in the mapping) and point its tensors there."""
    with torch.no_grad():
        copy.copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
        moved = copy.untyped_storage()  # views the mapping (the tensors keep it mapped)
        for tensor in tensors:
            tensor.data = torch.empty(0, dtype=tensor.dtype).set_(
                moved, tensor.storage_offset(), tensor.size(), tensor.stride()
            )


def _trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim): weights under glibc's mmap threshold
    (up to 32 MiB) lived on the heap, and their freed room would otherwise stay resident (bench model: 78 MiB
    of RSS kept)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator keeps its own policy
        pass


def _storages(modules: Iterable[nn.Module], *, min_bytes: int) -> list[tuple[torch.UntypedStorage, list[Tensor]]]:
    """Each distinct CPU storage of min_bytes or more, with every parameter and buffer viewing it (once each)."""
    seen: set[int] = set()
    by_storage: dict[int, tuple[torch.UntypedStorage, list[Tensor]]] = {}
    for root in modules:
        for module in root.modules():
            for tensor in (*module._parameters.values(), *module._buffers.values()):
                if tensor is None or id(tensor) in seen or not _movable(tensor):
                    continue
                seen.add(id(tensor))
                storage = tensor.untyped_storage()
                if storage.nbytes() >= min_bytes:
                    by_storage.setdefault(storage.data_ptr(), (storage, []))[1].append(tensor)
    return list(by_storage.values())


def _movable(tensor: Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.layout is torch.strided and not tensor.is_quantized


def _address(region: mmap.mmap) -> int:
    probe = torch.frombuffer(region, dtype=torch.uint8, count=1)
    return probe.data_ptr()
