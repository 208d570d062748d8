"""How the engine uses the prefix cache for its rows: whose KV a row's prompt is (its owner), what it can
reuse, what it adds after its prefill and when it finishes, and the blocks it holds meanwhile.

A row's owner is the base model or the one load of the adapter it runs with; a mix of adapters is not
cached (no owner). A row asking for prompt logprobs reuses nothing (it needs every prompt position's
logits) but still adds its prompt. Reuse always leaves at least one prompt token to prefill, whose logits
give the first generated token. Engine thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import Tensor

from loramux.core.engine.prefix_cache import BASE_OWNER, Block, KvSlice, Owner, PrefixCache, chain_digests
from loramux.core.engine.row import Row
from loramux.core.model.kv_cache import GrowableCache, GrowableLayer

log = logging.getLogger(__name__)


def owner_of(row: Row) -> Owner | None:
    if row.request.adapter_mix:
        return None
    if row.adapter is not None:
        return row.adapter.load_id
    return BASE_OWNER if not row.claims else None  # claims but no adapter: not settled yet


class RowPrefixes:
    def __init__(self, cache: PrefixCache) -> None:
        self.cache = cache

    def cached_tokens(self, row: Row) -> int:
        """Prompt tokens a prefill of ``row`` would skip now (the scheduler's view; holds nothing)."""
        return sum(len(b.tokens) for b in self._match(row))

    def take(self, row: Row) -> list[Block]:
        """The blocks ``row``'s prefill reuses, held until the row lets go; counts the lookup."""
        blocks = self._match(row)
        self.cache.hold(blocks)
        row.prefix_blocks = list(blocks)
        if self._digests(row) is not None:
            self.cache.record_lookup(prompt_tokens=len(row.prompt_ids), reused=sum(len(b.tokens) for b in blocks))
        return blocks

    def store_prompt(self, row: Row, cache: GrowableCache, index: int) -> None:
        """After its prefill: add the full blocks of ``row``'s prompt, row ``index`` of ``cache``."""
        digests = self._digests(row)
        if digests is not None:
            self._extend(row, digests, row.prompt_ids, row_slice(cache, index, length=len(row.prompt_ids)))

    def store_output(self, row: Row, cache: GrowableCache, index: int, *, length: int) -> None:
        """As it leaves the batch: add the blocks of its prompt and output whose KV the batch holds (``length``
        tokens: the last generated token was never fed), so the next turn of a conversation reuses them."""
        owner = owner_of(row)
        if not self.cache.enabled or owner is None or length <= len(row.prompt_ids):
            return
        tokens = [*row.prompt_ids, *row.output_ids][:length]
        digests = chain_digests(owner, tokens, block_tokens=self.cache.block_tokens)
        self._extend(row, digests, tokens, row_slice(cache, index, length=length))

    def release(self, row: Row) -> None:
        self.cache.release(row.prefix_blocks)
        row.prefix_blocks = []

    def _extend(self, row: Row, digests: Sequence[bytes], tokens: Sequence[int], kv: KvSlice) -> None:
        try:
            row.prefix_blocks += self.cache.extend(row.prefix_blocks, digests, tokens, kv)
        except Exception:  # out of memory copying blocks, say: the cache is only an optimization
            log.exception("prefix cache: could not add blocks; continuing without them")

    def _match(self, row: Row) -> list[Block]:
        digests = self._digests(row)
        if digests is None or row.request.prompt_logprobs:
            return []
        return self.cache.match(digests, row.prompt_ids, limit=len(row.prompt_ids) - 1)

    def _digests(self, row: Row) -> list[bytes] | None:
        """The digest chain of its prompt for its owner (computed once per owner: a reload is a new owner)."""
        owner = owner_of(row)
        if not self.cache.enabled or owner is None:
            return None
        if row.prefix_digests is None or row.prefix_digests[0] != owner:
            row.prefix_digests = (owner, chain_digests(owner, row.prompt_ids, block_tokens=self.cache.block_tokens))
        return row.prefix_digests[1]


def row_slice(cache: GrowableCache, index: int, *, length: int) -> KvSlice:
    """Tokens [start, end) of the row ``index`` of a left-padded cache, whose ``length`` tokens end at its last
    column: per layer (H, n, D) views."""
    layers = [layer for layer in cache.layers if isinstance(layer, GrowableLayer)]

    def kv(start: int, end: int) -> tuple[list[Tensor], list[Tensor]]:
        keys: list[Tensor] = []
        values: list[Tensor] = []
        for layer in layers:
            assert layer.keys is not None and layer.values is not None
            first = layer.keys.shape[2] - length
            keys.append(layer.keys[index, :, first + start : first + end])
            values.append(layer.values[index, :, first + start : first + end])
        return keys, values

    return kv


def split_by_reuse(rows: Sequence[Row], prefixes: RowPrefixes) -> list[tuple[list[Row], list[list[Block]]]]:
    """The step's new rows as prefill groups: those reusing a cached prefix, and those reusing none (so a long
    uncached prompt does not make the others recompute their cached part). Takes (holds) each row's blocks."""
    groups: dict[bool, tuple[list[Row], list[list[Block]]]] = {}
    for row in rows:
        blocks = prefixes.take(row)
        group = groups.setdefault(bool(blocks), ([], []))
        group[0].append(row)
        group[1].append(blocks)
    return list(groups.values())
