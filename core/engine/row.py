"""A request admitted to the engine, and its progress once it runs (engine thread only)."""

from __future__ import annotations

from dataclasses import dataclass, field

from loramux.core.adapters.adapter import LoadedAdapter
from loramux.core.adapters.claims import Claim
from loramux.core.adapters.manager import AdapterManager
from loramux.core.engine.prefix_cache import Block
from loramux.core.engine.requests import EventChannel, FinishReason, GenerationRequest, TokenLogprob
from loramux.core.engine.sampling import RowSampler
from loramux.core.engine.scheduler import Readiness
from loramux.core.engine.text_stream import TextStream
from loramux.core.errors import LoramuxError
from loramux.core.lora.mix import mix_weights
from loramux.core.lora.weights import AdapterWeights


@dataclass(eq=False)
class Row:
    request: GenerationRequest
    channel: EventChannel
    key: str | None  # its adapter's name (a mix: its members'), None for the base model: its scheduler queue
    claims: list[Claim]  # on its adapter, or each member of its mix: given back when the row leaves, always
    prompt_ids: list[int]
    max_new_tokens: int
    sampler: RowSampler
    text: TextStream
    adapter: LoadedAdapter | None = None  # once its claim is settled (before it joins the batch)
    mix: list[tuple[LoadedAdapter, float]] = field(default_factory=list)  # a mix's members, once settled
    weights: AdapterWeights | None = None  # what routing uses: the adapter's weights, or the mix's
    error: LoramuxError | None = None  # why it could not start (its adapter failed to load)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # filled by its prefill, when asked
    generated: int = 0
    last_token: int = -1
    finish: FinishReason | None = None
    stop_token: int | None = None  # the stop token id that finished it
    output_ids: list[int] = field(default_factory=list)  # every token sampled, EOS and stop tokens included
    prefix_blocks: list[Block] = field(default_factory=list)  # prefix-cache blocks it holds (prefix_reuse.py)
    prefix_digests: tuple[int, list[bytes]] | None = None  # (owner, digest chain of its prompt), once computed
    cached_prompt_tokens: int = 0  # prompt tokens its prefill started after (their KV from the prefix cache)

    @property
    def final_len(self) -> int:
        """Its length once finished at the latest: what the KV budget counts."""
        return len(self.prompt_ids) + self.max_new_tokens

    @property
    def top_logprobs(self) -> int:
        return self.request.top_logprobs

    # -- its adapter ----------------------------------------------------------------------------------

    def readiness(self, manager: AdapterManager) -> Readiness:
        """The scheduler's view while it waits: its adapter settled (READY), loading (WAIT), or DROP. Asked
        again and again (every step, and twice in one); once its load failed it stays DROP: the failed settle
        spent its claim, and settling a spent claim again would give no adapter, which reads as the base model."""
        if self.channel.cancelled.is_set() or self.error is not None:
            return Readiness.DROP
        for claim in self.claims:
            if claim.adapter is not None and manager.requeue_if_draining(claim):
                self.adapter, self.weights = None, None  # it waits for its adapter to come back
        if not all(claim.ready for claim in self.claims):
            return Readiness.WAIT
        if self.weights is None and self.claims:
            try:
                self._settle(manager)
            except LoramuxError as exc:  # its adapter failed to load, or a mix cannot hold it
                self.error = exc
                return Readiness.DROP
        return Readiness.READY

    def _settle(self, manager: AdapterManager) -> None:
        adapters = [manager.settle(claim) for claim in self.claims]
        if not self.request.adapter_mix:
            self.adapter = adapters[0]
            self.weights = self.adapter.weights if self.adapter is not None else None
            return
        self.mix = [(a, w) for a, (_, w) in zip(adapters, self.request.adapter_mix, strict=True) if a is not None]
        self.weights = mix_weights([(a.name, a.weights, w) for a, w in self.mix])

    def release(self, manager: AdapterManager) -> None:
        """Give its claims back (it left the engine, whatever the reason). Idempotent."""
        for claim in self.claims:
            manager.release(claim)
