"""Giving back a thread's OpenMP workers (loramux.core.threads), and the engine doing it while it starts."""

from __future__ import annotations

import copy
import os
import threading
from pathlib import Path

import pytest
import torch

from loramux.core import AdapterManager, Engine, EngineConfig
from loramux.core import threads as omp_threads
from tests.service.harness import wait_until

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

needs_gomp = pytest.mark.skipif(
    omp_threads.loaded_runtime() is None or "gomp" not in omp_threads.loaded_runtime().name,  # type: ignore[union-attr]
    reason="torch here does not use GNU OpenMP (libgomp), whose workers are OS threads of this process",
)


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_the_runtime_torch_loaded_is_found():
    runtime = omp_threads.loaded_runtime()
    assert runtime is not None and runtime.is_file()
    assert runtime.name.startswith(omp_threads.RUNTIMES)


def test_no_runtime_in_the_map_or_no_map(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 00000000 08:01 12 /usr/lib/libc.so.6\n"
        "7f02-7f03 rw-p 00000000 00:00 0\n"  # an anonymous mapping: no path field
        "7f04-7f05 r-xp 00000000 08:01 13 /opt/lib/libgompish.txt\n"
    )
    assert omp_threads.loaded_runtime(maps) is None
    assert omp_threads.loaded_runtime(tmp_path / "absent") is None
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 12 /x/torch/lib/libgomp-a34b3233.so.1\n")
    assert omp_threads.loaded_runtime(maps) == Path("/x/torch/lib/libgomp-a34b3233.so.1")


@needs_gomp
def test_release_ends_the_calling_threads_workers_and_they_come_back_on_demand():
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: no OpenMP workers to give back")
    workers = torch.get_num_threads() - 1
    x = torch.randn(1024, 1024)
    observed: dict[str, int] = {}
    done = threading.Event()

    def on_a_thread() -> None:
        try:
            before = os_threads()
            x @ x  # a parallel op: this thread's pool starts its workers
            observed["with_pool"] = os_threads() - before
            assert omp_threads.release_thread_pool()
            wait_until(lambda: os_threads() == before, timeout=10, what="the pool's workers to end")
            observed["released"] = os_threads() - before
            x @ x  # the next parallel op starts new ones
            observed["again"] = os_threads() - before
            omp_threads.release_thread_pool()
        finally:
            done.set()

    thread = threading.Thread(target=on_a_thread)
    thread.start()
    assert done.wait(60), "the releasing thread did not finish"
    thread.join()
    assert observed == {"with_pool": workers, "released": 0, "again": workers}


def test_release_without_a_pool_is_harmless():
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(omp_threads.release_thread_pool()))
    thread.start()
    thread.join()
    assert result == [omp_threads.loaded_runtime() is not None]


def test_the_thread_building_an_engine_gives_its_workers_back_before_the_engine_times_kernels(
    base_model, tokenizer, monkeypatch
):
    # the engine thread times kernels at start (--linear-kernel auto, --lora-kernel auto) while the building
    # thread waits: a live pool there parked every worker between regions and slowed the cells 3-15x
    events: list[tuple[str, int]] = []
    real_release = omp_threads.release_thread_pool

    def release() -> bool:
        events.append(("release", threading.get_ident()))
        return real_release()

    import loramux.core.engine.engine as engine_module

    real_start = engine_module.start_linear_kernels

    def start_linear_kernels(*args, **kwargs):
        events.append(("timing", threading.get_ident()))
        return real_start(*args, **kwargs)

    monkeypatch.setattr(engine_module, "release_thread_pool", release)
    monkeypatch.setattr(engine_module, "start_linear_kernels", start_linear_kernels)
    model = copy.deepcopy(base_model)
    engine = Engine(model, tokenizer, AdapterManager(model), EngineConfig())
    try:
        kinds = [kind for kind, _ in events]
        assert kinds[:2] == ["release", "timing"]  # given back before the timing starts
        assert events[0][1] == threading.get_ident()  # by the building thread
        assert events[1][1] != threading.get_ident()  # the timing: on the engine thread
    finally:
        engine.close()
