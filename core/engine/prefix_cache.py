"""Prompt KV kept by blocks of tokens, so a prompt that starts like an earlier one prefills only the rest.

A block holds the keys and values of ``block_tokens`` consecutive tokens, for every layer. It is found by a
digest chain: the first block's digest hashes the *owner* (what the KV depends on besides the tokens: the
base model, or one load of one adapter) and its tokens; each next block's digest hashes its parent's digest
and its own tokens. So a block is only ever found by a prompt with the same owner and the same tokens up to
and including that block: KV never crosses adapters, versions or loads, by construction (vllm#30931 was a
cache keyed by tokens alone). An adapter that is replaced, evicted or unloaded is loaded again as a new
owner; its old blocks are orphaned and leave by LRU.

Memory is bounded (``max_bytes``): a block is added only when it fits, after evicting the least recently used
blocks that no row holds. A row holds (``hold``) the chain it reused and the blocks it added until it leaves,
so a running row's blocks survive any eviction pressure. Evicting a block evicts the blocks after it (no one
holds them either: holds are always whole chains from the first block). Engine thread only, except ``stats``.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor

Owner = int  # BASE_OWNER, or an adapter load's load_id
BASE_OWNER: Owner = 0
DIGEST_BYTES = 16  # blake2b-128: a collision is out of reach, and tokens are compared on a hit anyway

# Per layer, the (H, n, D) keys and values of tokens [start, end) of one row: where a block's KV comes from.
KvSlice = Callable[[int, int], tuple[list[Tensor], list[Tensor]]]


@dataclass(frozen=True)
class PrefixStats:
    """Counters since start (a lookup is one request's prompt, at its prefill), and what is held now."""

    lookups: int = 0
    hits: int = 0  # lookups that reused at least one block
    hit_tokens: int = 0  # prompt tokens not prefilled thanks to the cache
    lookup_tokens: int = 0  # prompt tokens of every lookup
    blocks: int = 0
    bytes: int = 0
    max_bytes: int = 0
    evictions: int = 0  # blocks evicted to make room
    skipped: int = 0  # blocks not added: no room, every block in the way held by a running row


@dataclass(eq=False)
class Block:
    digest: bytes
    parent: Block | None
    tokens: tuple[int, ...]
    keys: list[Tensor]  # per layer (H, block_tokens, D), copies owned by the cache
    values: list[Tensor]
    nbytes: int
    holds: int = 0
    children: dict[bytes, Block] = field(default_factory=dict)


def chain_digests(owner: Owner, tokens: Sequence[int], *, block_tokens: int) -> list[bytes]:
    """The digest of every full block of ``tokens`` for ``owner``, in order."""
    digests: list[bytes] = []
    previous = owner.to_bytes(8, "little", signed=True)
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        block = array("q", tokens[start : start + block_tokens]).tobytes()
        previous = hashlib.blake2b(previous + block, digest_size=DIGEST_BYTES).digest()
        digests.append(previous)
    return digests


class PrefixCache:
    def __init__(self, *, max_bytes: int, block_tokens: int) -> None:
        if max_bytes < 0 or block_tokens < 1:
            raise ValueError(f"prefix cache needs max_bytes >= 0 and block_tokens >= 1 ({max_bytes}, {block_tokens})")
        self.max_bytes, self.block_tokens = max_bytes, block_tokens
        self._blocks: dict[bytes, Block] = {}
        self._unheld: OrderedDict[bytes, Block] = OrderedDict()  # evictable, least recently used first
        self._bytes = 0
        self._lookups = self._hits = self._hit_tokens = self._lookup_tokens = self._evictions = self._skipped = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def stats(self) -> PrefixStats:
        """A snapshot (plain int reads: any thread)."""
        return PrefixStats(
            lookups=self._lookups,
            hits=self._hits,
            hit_tokens=self._hit_tokens,
            lookup_tokens=self._lookup_tokens,
            blocks=len(self._blocks),
            bytes=self._bytes,
            max_bytes=self.max_bytes,
            evictions=self._evictions,
            skipped=self._skipped,
        )

    def match(self, digests: Sequence[bytes], tokens: Sequence[int], *, limit: int) -> list[Block]:
        """The longest chain of cached blocks starting the prompt, covering at most ``limit`` tokens. Pure."""
        found: list[Block] = []
        b = self.block_tokens
        for i, digest in enumerate(digests[: limit // b]):
            block = self._blocks.get(digest)
            if block is None or block.tokens != tuple(tokens[i * b : (i + 1) * b]):
                break
            found.append(block)
        return found

    def record_lookup(self, *, prompt_tokens: int, reused: int) -> None:
        self._lookups += 1
        self._lookup_tokens += prompt_tokens
        if reused:
            self._hits += 1
            self._hit_tokens += reused

    def hold(self, blocks: Sequence[Block]) -> None:
        for block in reversed(blocks):  # the chain's last blocks are the least recently used: they go first
            block.holds += 1
            self._unheld.pop(block.digest, None)

    def release(self, blocks: Sequence[Block]) -> None:
        for block in reversed(blocks):
            block.holds -= 1
            if block.holds == 0 and block.digest in self._blocks:
                self._unheld[block.digest] = block
                self._unheld.move_to_end(block.digest)

    def extend(self, chain: list[Block], digests: Sequence[bytes], tokens: Sequence[int], kv: KvSlice) -> list[Block]:
        """Add the blocks after ``chain`` (held by the caller) for every full block of ``tokens``, copying their KV
        from ``kv``, as long as they fit; returns the added blocks, held. Blocks already cached are reused."""
        added: list[Block] = []
        b = self.block_tokens
        parent = chain[-1] if chain else None
        for i in range(len(chain), min(len(digests), len(tokens) // b)):
            block = self._blocks.get(digests[i])
            if block is None:
                block = self._add(digests[i], parent, tuple(tokens[i * b : (i + 1) * b]), kv, i * b)
                if block is None:
                    break
            elif block.tokens != tuple(tokens[i * b : (i + 1) * b]):
                break
            self.hold([block])
            added.append(block)
            parent = block
        return added

    def _add(
        self, digest: bytes, parent: Block | None, tokens: tuple[int, ...], kv: KvSlice, start: int
    ) -> Block | None:
        keys, values = kv(start, start + len(tokens))
        nbytes = sum(t.nbytes for t in (*keys, *values))
        if not self._make_room(nbytes):
            self._skipped += 1
            return None
        block = Block(digest, parent, tokens, [k.clone() for k in keys], [v.clone() for v in values], nbytes)
        self._blocks[digest] = block
        if parent is not None:
            parent.children[digest] = block
        self._bytes += nbytes
        self._unheld[digest] = block
        return block

    def _make_room(self, nbytes: int) -> bool:
        if nbytes > self.max_bytes:
            return False
        while self._bytes + nbytes > self.max_bytes and self._unheld:
            _, block = self._unheld.popitem(last=False)
            self._evict(block)
        return self._bytes + nbytes <= self.max_bytes

    def _evict(self, block: Block) -> None:
        """Drop ``block`` and every block after it (none is held: a hold covers a chain from its first block)."""
        if block.parent is not None:
            block.parent.children.pop(block.digest, None)
        stack = [block]  # not recursive: a long conversation's chain has thousands of blocks
        while stack:
            gone = stack.pop()
            stack.extend(gone.children.values())
            gone.children = {}
            self._unheld.pop(gone.digest, None)
            if self._blocks.pop(gone.digest, None) is not None:
                self._bytes -= gone.nbytes
                self._evictions += 1
