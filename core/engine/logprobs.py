"""Log-probabilities for the requests that ask (nobody else pays): log_softmax of the logits in float32, before
any sampling setting changes them, the chosen token's and the top-n alternatives'."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from loramux.core.engine.requests import TokenLogprob, TopLogprob


def logprobs_of(logits: Tensor, tokens: Sequence[int], top: Sequence[int]) -> list[TokenLogprob]:
    """logits (M, V), the M chosen tokens and each one's top-n count -> one TokenLogprob each."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # (M, V)
    chosen = lp.gather(1, torch.tensor(list(tokens), dtype=torch.long, device=lp.device).unsqueeze(1))  # (M, 1)
    k = max(top, default=0)
    best = torch.topk(lp, k, dim=-1) if k else None
    values = best.values.tolist() if best is not None else [[]] * len(tokens)
    ids = best.indices.tolist() if best is not None else [[]] * len(tokens)
    return [
        TokenLogprob(token, value, tuple(TopLogprob(i, v) for i, v in zip(ids[m][:n], values[m][:n], strict=True)))
        for m, (token, value, n) in enumerate(zip(tokens, chosen[:, 0].tolist(), top, strict=True))
    ]


def prompt_logprobs(logits: Tensor, prompt: Sequence[int], top: int) -> list[TokenLogprob]:
    """logits (L, V) at a prompt's L positions -> the log-probabilities of its tokens 1..L-1, each given the
    ones before it (position t predicts token t + 1)."""
    if len(prompt) < 2:
        return []
    return logprobs_of(logits[: len(prompt) - 1], prompt[1:], [top] * (len(prompt) - 1))
