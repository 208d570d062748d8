"""The KV cache's memory bound, as the scheduler applies it before a request joins the batch.

The batch's cache is left-padded: every row is as wide as the longest, and buffers grow with spare room
(``kv_cache.buffer_columns``). Rows only ever grow to their final length (prompt + max_new_tokens) and every
buffer is allocated for the rows of the batch at that moment, so a batch whose rows end at lengths L_i never
needs more than ``rows x buffer_columns(max L_i)`` positions of every layer's keys and values: admitting a
request only when that bound stays within the budget keeps the cache within it until every row has finished,
without ever stopping a running stream. A long prompt being prefilled a chunk per step counts as a row, and so
does each row the buffers still hold room for after it left (until they are next allocated).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loramux.core.model.kv_cache import buffer_columns


@dataclass(frozen=True)
class KvBudget:
    bytes_per_token: int  # one position of keys and values across all layers (capacity.kv_bytes_per_token)
    max_bytes: int

    def cost(self, finals: Sequence[int]) -> int:
        """The most bytes a batch whose rows end at lengths ``finals`` may hold."""
        return len(finals) * buffer_columns(max(finals)) * self.bytes_per_token if finals else 0

    def fits(self, finals: Sequence[int]) -> bool:
        return self.cost(finals) <= self.max_bytes

    def longest_alone(self) -> int:
        """The longest final length one request may have and ever fit (0: none fits)."""
        lo, hi = 0, self.max_bytes // max(self.bytes_per_token, 1)
        while lo < hi:  # the largest n with cost([n]) <= max_bytes (cost grows with n)
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.fits([mid]) else (lo, mid - 1)
        return lo
