"""What the engine holds at one moment: a plain snapshot for metrics, routers and tests (any thread)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from loramux.core.engine.row import Row
from loramux.core.model.kv_cache import GrowableCache


@dataclass(frozen=True)
class EngineLoad:
    """Adapter names exclude the base model."""

    running: int  # rows in the decode batch
    waiting: int  # requests queued for a batch row (a prompt being chunked included)
    running_adapters: frozenset[str]
    waiting_adapters: frozenset[str]
    steps: int  # decode steps so far
    kv_cache_bytes: int = 0  # memory held by the KV caches (the batch's, and a chunked prompt's), spare room included
    kv_cache_tokens: int = 0  # token positions the batch's rows use
    kv_cache_padded_tokens: int = 0  # rows x columns of the left-padded cache (what each step attends over)
    kv_cache_max_bytes: int = 0  # the KV budget
    waiting_kv: int = 0  # requests at the head of their queue waiting for KV room (at the last step)


def engine_load(
    *,
    rows: Sequence[Row],
    waiting: Sequence[Row],
    steps: int,
    caches: Sequence[GrowableCache],
    mask: Tensor | None,
    kv_max_bytes: int,
    kv_blocked: int,
) -> EngineLoad:
    return EngineLoad(
        running=len(rows),
        waiting=len(waiting),
        running_adapters=frozenset(name for r in rows for name in _names(r)),
        waiting_adapters=frozenset(name for r in waiting for name in _names(r)),
        steps=steps,
        kv_cache_bytes=sum(c.allocated_bytes() for c in caches),
        kv_cache_tokens=sum(len(r.prompt_ids) + r.generated - 1 for r in rows),  # the newest token: next step
        kv_cache_padded_tokens=mask.shape[0] * mask.shape[1] if mask is not None else 0,
        kv_cache_max_bytes=kv_max_bytes,
        waiting_kv=kv_blocked,
    )


def _names(row: Row) -> list[str]:
    """The adapters a row runs with: its adapter, or its mix's members."""
    if row.request.adapter_mix:
        return [name for name, _ in row.request.adapter_mix]
    return [row.key] if row.key is not None else []
