"""Large CPU buffers in mappings of their own, so that freeing one gives its memory back to the system at once.

glibc serves a request from its heap unless it is at least the mmap threshold, and that threshold rises (up
to 32 MiB) each time a mapped block is freed. After the first few frees, adapter weights (one buffer per
adapter), KV cache buffers and the like all come from the heap, interleaved with everything else, and a
server that loads and evicts adapters all day keeps the freed ones resident as holes it cannot return.
`make bench-scale` measured it (AMD EPYC, glibc's mallinfo2 at the peak): 555 MiB free inside a 1,368 MiB
heap, and peak RSS 34-45 % over base + adapter budget. The buffers that come and go with adapters and batches
are mapped here instead: adapters' weights, and the KV buffers a running batch regrows or rebuilds. The
price is a page fault per 4 KiB of a new mapping, where a heap block freed earlier is reused warm: a
prefill's own KV and the prefix cache's seeded buffers measured 108 -> 290-330 ms per 8 rows x 1,056
tokens mapped (bench.prefix), so those, like everything else (the model's weights, per-step temporaries,
gRPC's message buffers), keep the allocator's own policy.
"""

from __future__ import annotations

import math
import mmap

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
