"""EventChannel delivery: sync and asyncio consumers, and batched delivery across channels."""

from __future__ import annotations

import asyncio
import threading

import pytest

from loramux.core import EventChannel, Finished, FinishReason, TokenDelta
from loramux.core.engine import requests
from loramux.core.engine.requests import deliver
from loramux.core.errors import RequestCancelledError


def finished() -> Finished:
    return Finished(reason=FinishReason.LENGTH, prompt_tokens=1, completion_tokens=2, adapter=None)


def test_deliver_to_sync_consumers_keeps_each_channels_order() -> None:
    a, b = EventChannel(), EventChannel()
    deliver([(a, TokenDelta("x", (1,))), (b, TokenDelta("y", (2,))), (a, TokenDelta("z", (3,)))])
    deliver([(a, finished()), (b, RequestCancelledError("gone"))])

    assert [e.text for e in a if isinstance(e, TokenDelta)] == ["x", "z"]
    with pytest.raises(RequestCancelledError):
        assert [e.text for e in b if isinstance(e, TokenDelta)] == ["y"]


def test_deliver_wakes_each_event_loop_once_per_batch() -> None:
    channels = [EventChannel() for _ in range(5)]
    received: dict[int, list[str]] = {i: [] for i in range(5)}
    wakeups = 0
    consuming = threading.Barrier(2)

    async def consume(i: int) -> None:
        async for event in channels[i]:
            if isinstance(event, TokenDelta):
                received[i].append(event.text)

    async def main() -> None:
        nonlocal wakeups
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe

        def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal wakeups
            wakeups += args[0] is requests._put_all  # not to_thread's own callbacks
            return original(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        tasks = [asyncio.create_task(consume(i)) for i in range(5)]
        await asyncio.sleep(0)  # every consumer has switched its channel to this loop
        await asyncio.to_thread(consuming.wait)
        await asyncio.gather(*tasks)

    def produce() -> None:  # the engine thread: two steps, then every row finishes
        consuming.wait()
        for step in ("a", "b"):
            deliver([(channel, TokenDelta(f"{step}{i}", (i,))) for i, channel in enumerate(channels)])
        deliver([(channel, finished()) for channel in channels])

    producer = threading.Thread(target=produce)
    producer.start()
    asyncio.run(main())
    producer.join()

    assert received == {i: [f"a{i}", f"b{i}"] for i in range(5)}
    assert wakeups == 3  # one per deliver call, not one per event (15)
