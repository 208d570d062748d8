"""Large CPU buffers in mappings of their own, so that freeing one gives its memory back to the system at once.

glibc serves a request from its heap unless it is at least the mmap threshold, and that threshold rises (up
to 32 MiB) each time a mapped block is freed. After the first few frees, adapter weights (one buffer per
adapter), KV cache buffers and the like all come from the heap, interleaved with everything else, and a
server that loads and evicts adapters all day keeps the freed ones resident as holes it cannot return.
`make bench-scale` measured it (AMD EPYC, glibc's mallinfo2 at the peak): 555 MiB free inside a 1,368 MiB
heap, and peak RSS 34-45 % over base + adapter budget. Adapters' weights, which come and go with loads and
evictions, are mapped here instead (``mapped_empty``); the price is a page fault per 4 KiB of each new
mapping. Everything else (the model's weights, per-step temporaries, gRPC's message buffers) keeps the
allocator's own policy.

KV buffers come and go with every batch, and a new page is dear: on the Firecracker VMs this project runs
on, memory given back to the system goes to the host (free page reporting), and its next first touch costs
several microseconds per 4 KiB (bench.prefix: seeding 8 rows x 1,072 cached tokens took 640-790 ms into new
pages, 72-85 ms into pages used before). A ``BufferArena`` is one mapping that buffers are carved from and
given back to, so its pages, once faulted in, serve buffer after buffer whatever their shapes; the engine's
KV cache draws from one bounded by the KV budget (vLLM and TGI keep their KV memory for the whole run too).
"""

from __future__ import annotations

import bisect
import math
import mmap
import sys
import threading
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

MIN_MAPPED_BYTES = 1 << 20  # smaller buffers stay on the heap: a mapping costs a system call and whole pages


def mapped_empty(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """Like torch.empty; on the CPU and from MIN_MAPPED_BYTES up, backed by an anonymous private mapping that is
    unmapped when the last tensor viewing it goes (the tensor keeps the mapping alive)."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < MIN_MAPPED_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    region = mmap.mmap(-1, nbytes)  # page-aligned, zero-filled on first touch
    return torch.frombuffer(region, dtype=dtype, count=numel).view(shape)


PAGE = mmap.PAGESIZE
_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)  # address space, not RAM


@dataclass(frozen=True)
class ArenaStats:
    max_bytes: int
    lent_bytes: int  # pieces some tensor views now
    touched_bytes: int  # the arena's high-water mark: its pages below it are resident
    lent: int  # buffers served from the arena
    overflowed: int  # buffers that did not fit and took a mapping of their own


class BufferArena:
    """Large CPU buffers carved from one mapping of ``max_bytes``, whose pieces are reused once let go.

    A buffer is a page-aligned piece, lent through a memoryview of its own. When every tensor viewing it is
    gone (plain reference counting: nothing reuses memory someone still reads) the piece is free again, and
    merges with free neighbours. Pieces are taken first-fit from the lowest address, so the pages in use stay
    at the arena's start and a new buffer lands on pages an earlier one already faulted in. The arena's pages,
    once touched, stay resident (its high-water mark, at most ``max_bytes``). A buffer that does not fit
    takes a mapping of its own (``mapped_empty``). Any thread: the last view of a buffer may go on another.
    """

    def __init__(self, *, max_bytes: int) -> None:
        self.max_bytes = max_bytes - max_bytes % PAGE
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE
        self._region = mmap.mmap(-1, self.max_bytes, flags=flags) if self.max_bytes else None
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = [(0, self.max_bytes)] if self.max_bytes else []  # (offset, size)
        self._lent_bytes = self._touched = self._lent = self._overflowed = 0

    def empty(self, shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device | str) -> Tensor:
        """Like torch.empty (contents undefined); from MIN_MAPPED_BYTES up on the CPU, a piece of the arena."""
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if torch.device(device).type != "cpu" or nbytes < MIN_MAPPED_BYTES or self._region is None:
            return torch.empty(shape, dtype=dtype, device=device)
        size = -(-nbytes // PAGE) * PAGE
        with self._lock:
            offset = self._take(size)
        if offset is None:
            return mapped_empty(shape, dtype=dtype, device=device)
        piece = memoryview(self._region)[offset : offset + size]
        weakref.finalize(piece, self._give, offset, size).atexit = False
        return torch.frombuffer(piece, dtype=dtype, count=numel).view(shape)

    def stats(self) -> ArenaStats:
        with self._lock:
            return ArenaStats(self.max_bytes, self._lent_bytes, self._touched, self._lent, self._overflowed)

    def _take(self, size: int) -> int | None:
        for i, (offset, free) in enumerate(self._free):
            if free >= size:
                self._free[i : i + 1] = [(offset + size, free - size)] if free > size else []
                self._lent_bytes += size
                self._touched = max(self._touched, offset + size)
                self._lent += 1
                return offset
        self._overflowed += 1
        return None

    def _give(self, offset: int, size: int) -> None:
        with self._lock:
            self._lent_bytes -= size
            i = bisect.bisect(self._free, (offset, size))
            if i < len(self._free) and offset + size == self._free[i][0]:  # merge with the next free piece
                size += self._free.pop(i)[1]
            if i and self._free[i - 1][0] + self._free[i - 1][1] == offset:  # and with the previous one
                offset, size = self._free[i - 1][0], self._free[i - 1][1] + size
                i -= 1
                self._free.pop(i)
            self._free.insert(i, (offset, size))
