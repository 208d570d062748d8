"""A step's tokens, out: sample one token per row, with its log-probability where asked, and stream the
events of every row together (``deliver``). Engine thread only."""

from __future__ import annotations

from collections.abc import Sequence, Set

from torch import Tensor

from loramux.core.engine.logprobs import logprobs_of
from loramux.core.engine.outputs import accept_token
from loramux.core.engine.requests import TokenLogprob, deliver
from loramux.core.engine.row import Row
from loramux.core.engine.sampling import sample_next_tokens


def emit_tokens(rows: Sequence[Row], logits: Tensor, *, eos: Set[int]) -> None:
    """Sample one token per row from ``logits`` (N, V) and send the events; marks rows that finished."""
    tokens = sample_next_tokens(logits.float(), [r.sampler for r in rows]).tolist()
    asking = [i for i, r in enumerate(rows) if r.request.logprobs]
    logprobs: list[TokenLogprob | None] = [None] * len(rows)
    if asking:  # before any sampling setting: the raw logits' log_softmax
        found = logprobs_of(logits[asking], [tokens[i] for i in asking], [rows[i].top_logprobs for i in asking])
        for i, entry in zip(asking, found, strict=True):
            logprobs[i] = entry
    events = [
        (row.channel, delta)
        for row, token, lp in zip(rows, tokens, logprobs, strict=True)
        if (delta := accept_token(row, token, eos=eos, logprob=lp))
    ]
    deliver(events)
