"""mapped_empty: large CPU buffers in mappings of their own, given back to the system when the last view goes;
BufferArena: buffers carved from one mapping, reused once their last view goes."""

from __future__ import annotations

import mmap
import threading
from pathlib import Path

import torch

from loramux.core.memory import MIN_MAPPED_BYTES, BufferArena, mapped_empty


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


MiB = 1 << 20


def test_an_arena_piece_is_reused_once_its_last_view_goes():
    arena = BufferArena(max_bytes=16 * MiB)
    first = arena.empty((2, 256, 1024), dtype=torch.float32, device="cpu")  # 2 MiB
    start = first.data_ptr()
    assert start % mmap.PAGESIZE == 0 and first.shape == (2, 256, 1024) and first.is_contiguous()
    first.fill_(7.0)
    view = first[1]
    del first
    other = arena.empty((2 * MiB,), dtype=torch.uint8, device="cpu")
    assert other.data_ptr() != start  # a view still reads the piece: it is not lent again
    other.fill_(1)
    assert float(view.min()) == float(view.max()) == 7.0
    assert arena.stats().lent_bytes == 4 * MiB
    del view
    assert arena.stats().lent_bytes == 2 * MiB
    again = arena.empty((512, 1024), dtype=torch.float32, device="cpu")
    assert again.data_ptr() == start  # first fit from the lowest address: the pages used before
    assert arena.stats().touched_bytes == 4 * MiB and arena.stats().lent == 3


def test_freed_neighbours_merge_into_one_piece():
    arena = BufferArena(max_bytes=8 * MiB)
    a, b, c = (arena.empty((2 * MiB,), dtype=torch.uint8, device="cpu") for _ in range(3))
    start = a.data_ptr()
    assert b.data_ptr() == start + 2 * MiB and c.data_ptr() == start + 4 * MiB
    del b, a  # out of order: the two pieces still merge
    merged = arena.empty((4 * MiB,), dtype=torch.uint8, device="cpu")
    assert merged.data_ptr() == start
    del merged, c
    whole = arena.empty((8 * MiB,), dtype=torch.uint8, device="cpu")  # and with the rest of the arena
    assert whole.data_ptr() == start
    assert arena.stats().overflowed == 0


def test_a_buffer_that_does_not_fit_takes_a_mapping_of_its_own():
    arena = BufferArena(max_bytes=4 * MiB)
    held = arena.empty((3 * MiB,), dtype=torch.uint8, device="cpu")
    start = held.data_ptr()
    big = arena.empty((2 * MiB,), dtype=torch.uint8, device="cpu")
    assert not start <= big.data_ptr() < start + 4 * MiB
    assert arena.stats().overflowed == 1 and arena.stats().lent_bytes == 3 * MiB
    big.fill_(2)
    assert int(big.sum()) == 4 * MiB


def test_small_buffers_other_devices_and_an_empty_arena_stay_with_torch():
    arena = BufferArena(max_bytes=4 * MiB)
    small = arena.empty((MIN_MAPPED_BYTES // 8,), dtype=torch.float32, device="cpu")
    meta = arena.empty((1 << 20,), dtype=torch.float16, device="meta")
    assert small.numel() == MIN_MAPPED_BYTES // 8 and meta.device.type == "meta"
    assert arena.stats().lent == 0
    none = BufferArena(max_bytes=0)
    assert none.empty((2 * MiB,), dtype=torch.uint8, device="cpu").numel() == 2 * MiB


def test_a_piece_freed_on_another_thread_comes_back():
    arena = BufferArena(max_bytes=4 * MiB)
    box = [arena.empty((2 * MiB,), dtype=torch.uint8, device="cpu")]
    start = box[0].data_ptr()
    worker = threading.Thread(target=box.clear)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert arena.stats().lent_bytes == 0
    assert arena.empty((4 * MiB,), dtype=torch.uint8, device="cpu").data_ptr() == start
