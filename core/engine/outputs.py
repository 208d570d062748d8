"""What a sampled token does to its row: the text it adds, whether it ends the row and why, and the events
the caller gets (a TokenDelta per token, one Finished at the end). Engine thread only; no tensors.
"""

from __future__ import annotations

from collections.abc import Set
from typing import Any

from torch import nn

from loramux.core.engine.requests import Finished, FinishReason, MixMember, TokenDelta, TokenLogprob
from loramux.core.engine.row import Row


def accept_token(row: Row, token: int, *, eos: Set[int], logprob: TokenLogprob | None = None) -> TokenDelta | None:
    """Append ``token`` to ``row``: advance its text (held back while a stop string may be forming), and mark
    it finished on EOS (unless ignored), a stop token id, a stop string or max_new_tokens. The delta to stream,
    if any (with the token's log-probability when the request asked for them)."""
    row.last_token = token
    row.output_ids.append(token)
    row.generated += 1
    request = row.request
    is_stop_token = token in request.stop_token_ids
    is_eos = (token in eos and not request.ignore_eos) or is_stop_token
    # stop strings are looked for only in the text after the first min_new_tokens tokens (vLLM's min_tokens)
    delta, stopped = row.text.push(token, match=row.generated > request.min_new_tokens) if not is_eos else ("", False)
    if stopped:
        row.finish = FinishReason.STOP_SEQUENCE
    elif is_stop_token:
        row.finish, row.stop_token = FinishReason.STOP_TOKEN, token
    elif is_eos:
        row.finish = FinishReason.EOS
    elif row.generated >= row.max_new_tokens:
        row.finish = FinishReason.LENGTH
    if row.finish is not None and row.finish is not FinishReason.STOP_SEQUENCE:
        delta += row.text.flush()
        if row.text.stopped:
            row.finish = FinishReason.STOP_SEQUENCE
    token_ids = () if is_eos or stopped else (token,)
    logprobs = (logprob,) if logprob is not None and token_ids else ()
    return TokenDelta(text=delta, token_ids=token_ids, logprobs=logprobs) if delta or token_ids else None


def finished_event(row: Row, reason: FinishReason) -> Finished:
    adapter = row.adapter
    return Finished(
        reason=reason,
        prompt_tokens=len(row.prompt_ids),
        completion_tokens=row.generated,
        adapter=adapter.name if adapter is not None else None,
        adapter_version=adapter.version if adapter is not None else 0,
        stop_sequence=row.text.matched_stop,
        seed=None if row.request.sampling.greedy else row.sampler.seed,
        stop_token_id=row.stop_token,
        prompt_logprobs=tuple(row.prompt_logprobs),
        adapter_mix=tuple(MixMember(a.name, a.version, w) for a, w in row.mix),
        cached_prompt_tokens=row.cached_prompt_tokens,
    )


def eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """The token ids that end a generation: the model's generation_config, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {int(eos)}
