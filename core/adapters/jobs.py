"""Loads that requests wait on: one job per adapter however many requests name it (single flight), run off
the engine thread, one at a time.

Why one at a time, on a thread that ends when there is no more work: every thread that runs torch ops keeps
an OpenMP pool while it lives, and a second live pool slows the engine's steps (BENCHMARKS.md); and one load
at a time bounds the memory of weights built but not yet resident to one adapter.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from loramux.core.adapters.adapter import LoadedAdapter, Registration
from loramux.core.errors import LoramuxError

log = logging.getLogger(__name__)
LOADER_NICE = 10


@dataclass(eq=False)
class LoadJob:
    """One load of a name's weights. Changed only under the manager's lock; ``done`` is set last."""

    name: str
    registration: Registration | None  # None: the name is not registered yet (a load on demand)
    waiters: int = 0  # requests waiting for it; each gets one lease of ``adapter``
    adapter: LoadedAdapter | None = None  # the result, leased once per waiter
    error: LoramuxError | None = None  # why it failed (every waiter fails with it)
    waiting_for_room: bool = False  # built, and waiting for the budget to make room
    done: threading.Event = field(default_factory=threading.Event)


class Loader:
    """Runs jobs in order on a worker thread that is started for them and ends when none is left."""

    def __init__(self, run: Callable[[LoadJob], None], *, name: str = "loramux-adapter-loader") -> None:
        self._run, self._name = run, name
        self._queue: collections.deque[LoadJob] = collections.deque()
        self._lock = threading.Lock()
        self._working = False

    def submit(self, job: LoadJob) -> None:
        with self._lock:
            self._queue.append(job)
            if not self._working:
                self._working = True
                threading.Thread(target=self._work, name=self._name, daemon=True).start()

    def _work(self) -> None:
        _lower_priority()
        while True:
            with self._lock:
                if not self._queue:
                    self._working = False
                    return
                job = self._queue.popleft()
            try:
                self._run(job)
            except BaseException:  # run() settles its job itself; this is a bug, and the next job still runs
                log.exception("adapter load of %r failed outside its job", job.name)


def _lower_priority() -> None:
    """Loads yield the CPU to the engine's threads (Linux: a thread has its own nice value): a load is ~10 ms
    of copies and checks, and on a machine the engine keeps busy it would slow every running stream's step."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICE)
    except (AttributeError, OSError):  # not Linux, or not permitted: loads run at the engine's priority
        pass
