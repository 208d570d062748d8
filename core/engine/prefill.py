"""Prefilling the rows that join the batch at a step: one forward for the group, each row starting after the
part of its prompt the prefix cache holds.

The group's new tokens are left-padded to the widest row's *uncached* length W; a row whose cached prefix is
longer than its prompt minus W recomputes the difference (so its cached and new tokens stay contiguous, as
the batch cache and ragged attention need: every row's tokens end at the last column, padding before them).
Each row's cached part comes first, right-aligned in a seeded cache:

    row with a hit:   [pad | cached prefix (from blocks) | new tokens ...........]
    row without:      [pad | pad                         | pad | prompt ..........]
                       <------- past width P ----------> <------- W ----------->

Positions come from the mask, so padding never shifts a row's positions. With no cached prefix at all this
is exactly the plain left-padded prefill.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from loramux.core.engine.logprobs import prompt_logprobs
from loramux.core.engine.prefix_cache import Block
from loramux.core.engine.row import Row
from loramux.core.lora.routing import build_plan, use_plan
from loramux.core.memory import BufferArena
from loramux.core.model import kv_batch
from loramux.core.model.kv_cache import GrowableCache, buffer_columns


def prefill_rows(
    model: nn.Module,
    rows: Sequence[Row],
    reused: Sequence[Sequence[Block]],
    *,
    pad: int,
    device: torch.device,
    arena: BufferArena | None = None,
) -> tuple[GrowableCache, Tensor, Tensor]:
    """Prefill ``rows`` (their cached blocks in ``reused``) -> their cache (its buffers from ``arena``), mask (N, S),
    last logits (N, V). Rows asking for prompt logprobs must come with no blocks (every prompt position's logits
    are needed)."""
    lengths = [len(r.prompt_ids) for r in rows]
    cached = [sum(len(b.tokens) for b in blocks) for blocks in reused]
    width = max(n - c for n, c in zip(lengths, cached, strict=True))  # new columns W
    used = [max(0, n - width) for n in lengths]  # cached tokens each row starts from (<= cached)
    past = max(used)
    ids, new_mask = kv_batch.left_pad(
        [r.prompt_ids[u:] for r, u in zip(rows, used, strict=True)], pad_id=pad, device=device
    )
    past_mask = torch.zeros((len(rows), past), dtype=torch.long, device=device)
    for i, u in enumerate(used):
        past_mask[i, past - u :] = 1
    mask = torch.cat([past_mask, new_mask], dim=1)  # (N, P + W)
    for row, u in zip(rows, used, strict=True):
        row.cached_prompt_tokens = u
    cache = seeded_cache(reused, used, columns=past, room=width, arena=arena) if past else GrowableCache(arena=arena)
    plan = build_plan([r.weights for r in rows], segmented=True)  # one forward: no per-row weight stacks
    every = any(r.request.prompt_logprobs for r in rows)  # every position's logits, only when asked
    with use_plan(plan):
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=kv_batch.prefill_positions(mask)[:, past:],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=0 if every else 1,
        )
    for i, row in enumerate(rows):
        if row.request.prompt_logprobs:  # its whole prompt is the last len(prompt) new columns
            own = out.logits[i, width - len(row.prompt_ids) :]
            row.prompt_logprobs = prompt_logprobs(own, row.prompt_ids, row.top_logprobs)
    return cache, mask, out.logits[:, -1, :]


def seeded_cache(
    reused: Sequence[Sequence[Block]], used: Sequence[int], *, columns: int, room: int, arena: BufferArena | None = None
) -> GrowableCache:
    """A cache of len(used) rows whose first ``columns`` columns hold, right-aligned, the first used[i] tokens of
    row i's blocks (zeros before them), with room for ``room`` more columns."""
    template = next(blocks[0] for blocks in reused if blocks)
    rows, capacity, size = len(used), buffer_columns(columns + room), len(template.tokens)
    empty = arena.empty if arena is not None else torch.empty
    buffers = []
    for layer, keys in enumerate(template.keys):
        heads, _, dim = keys.shape
        pair = []
        for part in ("keys", "values"):
            buffer = empty((rows, heads, capacity, dim), dtype=keys.dtype, device=keys.device)
            for i, (blocks, n) in enumerate(zip(reused, used, strict=True)):
                buffer[i, :, : columns - n].zero_()  # padding is masked, but must be finite (0 x NaN is NaN)
                whole, rest = divmod(n, size)
                states = [getattr(block, part)[layer] for block in blocks[:whole]]
                if states:  # one copy of the whole blocks, straight into the row's columns
                    torch.cat(states, dim=1, out=buffer[i, :, columns - n : columns - rest])
                if rest:  # the first tokens of the next block: the row recomputes the others
                    buffer[i, :, columns - rest : columns].copy_(getattr(blocks[whole], part)[layer][:, :rest])
            pair.append(buffer)
        buffers.append((pair[0], pair[1]))
    return GrowableCache.adopting(buffers, rows=rows, length=columns, arena=arena)
