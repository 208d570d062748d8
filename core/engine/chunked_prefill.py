"""Prefilling one long prompt a chunk per engine step, so that the running rows keep decoding meanwhile.

A prompt of thousands of tokens prefilled in one forward stalls every running stream for that forward's
whole duration (seconds on a CPU). The engine instead feeds such a prompt ``chunk`` tokens per step into a
cache of its own, between the batch's decode steps; after the last chunk the row samples its first token
and joins the batch like any other. Each chunk attends to the cached tokens before it, so the result is
the one-shot prefill's up to float rounding (the attention sums in a different order). A prompt whose start
the prefix cache holds starts after it, from a cache seeded with those blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from loramux.core.engine.logprobs import logprobs_of
from loramux.core.engine.prefill import seeded_cache
from loramux.core.engine.prefix_cache import Block
from loramux.core.engine.row import Row
from loramux.core.lora.routing import RoutingPlan, build_plan, use_plan
from loramux.core.memory import BufferArena
from loramux.core.model.kv_cache import GrowableCache


@dataclass
class ChunkedPrefill:
    row: Row
    plan: RoutingPlan  # the row's own (one-row) routing plan
    cache: GrowableCache = field(default_factory=GrowableCache)
    done: int = 0  # prompt tokens already in the cache

    @classmethod
    def after(cls, row: Row, blocks: Sequence[Block], *, room: int, arena: BufferArena | None = None) -> ChunkedPrefill:
        """The prefill of ``row``'s prompt after the cached ``blocks`` it starts with (none: from its start), into
        a cache whose buffers come from ``arena``."""
        plan = build_plan([row.weights], segmented=True)
        if not blocks:
            return cls(row, plan=plan, cache=GrowableCache(arena=arena))
        done = row.cached_prompt_tokens = sum(len(b.tokens) for b in blocks)
        cache = seeded_cache([blocks], [done], columns=done, room=room, arena=arena)
        return cls(row, plan=plan, cache=cache, done=done)

    @property
    def finished(self) -> bool:
        return self.done == len(self.row.prompt_ids)

    def step(self, model: nn.Module, *, chunk: int, device: torch.device) -> Tensor | None:
        """Prefill the next ``chunk`` tokens. Returns the last prompt position's logits (1, V) after the final
        chunk, else None."""
        prompt = self.row.prompt_ids
        start, end = self.done, min(self.done + chunk, len(prompt))
        ids = torch.tensor([prompt[start:end]], dtype=torch.long, device=device)  # (1, C)
        request = self.row.request
        with use_plan(self.plan):
            out = model(
                input_ids=ids,
                attention_mask=torch.ones((1, end), dtype=torch.long, device=device),  # (1, cached + C)
                position_ids=torch.arange(start, end, device=device).unsqueeze(0),  # (1, C)
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=0 if request.prompt_logprobs else 1,
            )
        if request.prompt_logprobs:  # position t predicts prompt token t + 1: this chunk's, and the next's first
            targets = prompt[start + 1 : end + 1]
            top = [request.top_logprobs] * len(targets)
            self.row.prompt_logprobs += logprobs_of(out.logits[0, : len(targets)], targets, top) if targets else []
        self.done = end
        return out.logits[:, -1, :] if self.finished else None

    def mask(self, *, device: torch.device) -> Tensor:
        """(1, prompt length) attention mask of the finished cache, for joining the batch."""
        return torch.ones((1, self.done), dtype=torch.long, device=device)
