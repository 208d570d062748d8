"""mapped_empty: large CPU buffers in mappings of their own, given back to the system when the last view goes."""

from __future__ import annotations

from pathlib import Path

import torch

from loramux.core.memory import MIN_MAPPED_BYTES, mapped_empty


def _mappings() -> set[str]:
    return {line.split()[0] for line in Path("/proc/self/maps").read_text().splitlines()}


def test_a_large_buffer_is_a_mapping_that_lives_as_long_as_its_views():
    before = _mappings()
    buffer = mapped_empty((4, 8, 1024, 16), dtype=torch.float32, device="cpu")  # 2 MiB
    assert buffer.shape == (4, 8, 1024, 16) and buffer.dtype is torch.float32 and buffer.is_contiguous()
    buffer.fill_(3.0)
    assert float(buffer.sum()) == 3.0 * buffer.numel()
    start = buffer.data_ptr()
    assert start % 4096 == 0
    ours = {m for m in _mappings() - before if int(m.split("-")[0], 16) == start}
    assert ours, "the buffer starts a mapping of its own"
    view = buffer[1:3, :, 10:20]
    del buffer
    assert ours <= _mappings()  # a view keeps it
    assert float(view.sum()) == 3.0 * view.numel()
    del view
    assert not ours & _mappings()  # unmapped with the last view: the memory is back with the system


def test_small_buffers_and_other_devices_stay_with_torch():
    small = mapped_empty((MIN_MAPPED_BYTES // 8,), dtype=torch.float32, device="cpu")
    assert small.numel() == MIN_MAPPED_BYTES // 8
    meta = mapped_empty((1 << 20,), dtype=torch.float16, device="meta")
    assert meta.device.type == "meta" and meta.shape == (1 << 20,)
