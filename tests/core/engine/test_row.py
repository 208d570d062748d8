"""A queued row's readiness, as the scheduler asks it: over and over, and twice in one step."""

from __future__ import annotations

from typing import Any, cast

from loramux.core.adapters.claims import Claim, Claims
from loramux.core.adapters.jobs import LoadJob
from loramux.core.engine.requests import EventChannel, GenerationRequest
from loramux.core.engine.row import Row
from loramux.core.engine.scheduler import Readiness
from loramux.core.errors import CorruptAdapterError


class Manager:
    """What readiness() uses of the adapter manager; settle is the real one (it needs no table)."""

    def requeue_if_draining(self, claim: Claim) -> bool:
        return False

    def settle(self, claim: Claim):
        return Claims.settle(cast(Any, None), claim)


def test_a_row_whose_load_failed_stays_dropped():
    """The load fails between the scheduler's drop pass and its admission pass: the admission pass sees the
    error (DROP, but the row stays queued until the next drop pass), and the next pass must see DROP again,
    not READY with no adapter, which would run the request on the base model."""
    job = LoadJob("tenant-bad/adapter", None, waiters=1)
    row = Row(
        request=GenerationRequest(prompt=(1, 2), adapter="tenant-bad/adapter"),
        channel=EventChannel(adapter="tenant-bad/adapter"),
        key="tenant-bad/adapter",
        claims=[Claim(job=job)],
        prompt_ids=[1, 2],
        max_new_tokens=4,
        sampler=cast(Any, None),
        text=cast(Any, None),
    )
    manager = cast(Any, Manager())
    assert row.readiness(manager) is Readiness.WAIT
    job.error = CorruptAdapterError("adapter_model.safetensors is truncated")
    job.done.set()
    assert row.readiness(manager) is Readiness.DROP
    assert row.readiness(manager) is Readiness.DROP  # before the fix: READY, with no adapter
    assert isinstance(row.error, CorruptAdapterError) and row.adapter is None
