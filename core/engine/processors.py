"""Logits processors, per row, batched: each row of (N, V) scores with its own settings, in transformers' order.

Penalties and suppression come first and apply in greedy decoding too: repetition (transformers'
RepetitionPenaltyLogitsProcessor, over prompt + completion), presence and frequency (OpenAI's formula over
the completion: ``logit[j] -= presence * (count[j] > 0) + frequency * count[j]``), and suppression of EOS and
stop token ids before min_new_tokens (MinNewTokensLengthLogitsProcessor, as vLLM extends it to stop ids).
Then the sampling warpers, for sampled rows only: temperature, top-k, top-p, min-p, typical (transformers'
TemperatureLogitsWarper, TopK, TopP, MinP, Typical, ``min_tokens_to_keep=1``). Each function touches only the
rows that use its setting; a batch where none does passes through untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from loramux.core.engine.sampling import RowSampler, SamplingParams


def index(rows: Sequence[int], device: torch.device) -> Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _column(values: Sequence[float], like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)  # (M, 1)


def _update_rows(scores: Tensor, rows: Sequence[int], fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn`` applied to the listed rows of (N, V) ``scores``; the whole tensor at once when all are listed."""
    if len(rows) == scores.shape[0]:
        return fn(scores)
    idx = index(rows, scores.device)
    scores = scores.clone()
    scores[idx] = fn(scores[idx])
    return scores


def apply_repetition_penalty(scores: Tensor, rows: Sequence[RowSampler]) -> Tensor:
    """RepetitionPenaltyLogitsProcessor per row: seen ids' logits < 0 are multiplied, others divided."""
    penalized = [i for i, r in enumerate(rows) if r.params.penalty is not None]
    if not penalized:
        return scores
    vocab, device = scores.shape[-1], scores.device
    mask = torch.stack([rows[i].seen_mask(vocab_size=vocab, device=device) for i in penalized])  # (P, V)
    penalty = _column([rows[i].params.penalty for i in penalized], scores)  # type: ignore[misc]

    def penalize(sub: Tensor) -> Tensor:  # (P, V)
        return torch.where(mask, torch.where(sub < 0, sub * penalty, sub / penalty), sub)

    return _update_rows(scores, penalized, penalize)


def apply_presence_frequency(scores: Tensor, rows: Sequence[RowSampler]) -> Tensor:
    """OpenAI's presence and frequency penalties over each row's completion so far."""
    on = [i for i, r in enumerate(rows) if r.params.counts_penalty]
    if not on:
        return scores
    vocab, device = scores.shape[-1], scores.device
    counts = torch.stack([rows[i].generated_counts(vocab_size=vocab, device=device) for i in on])  # (P, V)
    presence = _column([rows[i].params.presence_penalty or 0.0 for i in on], scores)
    frequency = _column([rows[i].params.frequency_penalty or 0.0 for i in on], scores)

    def penalize(sub: Tensor) -> Tensor:  # (P, V)
        return sub - presence * (counts > 0) - frequency * counts

    return _update_rows(scores, on, penalize)


def apply_suppression(scores: Tensor, rows: Sequence[RowSampler]) -> Tensor:
    """Before min_new_tokens: EOS and the stop token ids get -inf."""
    on = [i for i, r in enumerate(rows) if r.suppressing]
    if not on:
        return scores
    scores = scores.clone()
    for i in on:
        ids = [t for t in rows[i].suppressed if t < scores.shape[-1]]
        scores[i, ids] = -math.inf
    return scores


def _apply_temperature(scores: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    temps = [p.sampling_temperature or 1.0 for p in params]
    if all(t == 1.0 for t in temps):
        return scores
    return scores / _column(temps, scores)


def _apply_top_k(scores: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """TopKLogitsWarper: drop logits below the k-th largest (ties with it are kept)."""
    vocab = scores.shape[-1]
    ks = [min(p.sampling_top_k or 0, vocab) for p in params]  # 0: off for this row
    kmax = max(ks)
    if kmax == 0 or (kmax == vocab and all(k in (0, vocab) for k in ks)):
        return scores
    top = torch.topk(scores, kmax, dim=-1).values  # (M, kmax), descending; kmax, not V, for rows that are off
    kth = top.gather(1, index([max(k, 1) - 1 for k in ks], scores.device).unsqueeze(1))  # (M, 1)
    kth = kth.masked_fill(index(ks, scores.device).unsqueeze(1) == 0, -math.inf)  # off: keep everything
    return scores.masked_fill(scores < kth, -math.inf)


def _apply_top_p(scores: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """TopPLogitsWarper on the rows that use it: drop the low tail whose cumulative mass is <= 1 - top_p."""
    on = [i for i, p in enumerate(params) if p.sampling_top_p is not None]
    if not on:
        return scores
    threshold = _column([1 - params[i].sampling_top_p for i in on], scores)  # type: ignore[operator]

    def top_p(sub: Tensor) -> Tensor:  # (P, V)
        sorted_logits, sorted_indices = torch.sort(sub, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (P, V)
        remove = cumulative <= threshold
        remove[..., -1:] = False  # min_tokens_to_keep=1: the top token always stays
        return sub.masked_fill(remove.scatter(1, sorted_indices, remove), -math.inf)

    return _update_rows(scores, on, top_p)


def _apply_min_p(scores: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """MinPLogitsWarper: drop tokens less likely than min_p times the top one (the top one always stays)."""
    on = [i for i, p in enumerate(params) if p.sampling_min_p is not None]
    if not on:
        return scores
    min_p = _column([params[i].sampling_min_p for i in on], scores)  # type: ignore[misc]

    def cut(sub: Tensor) -> Tensor:  # (P, V)
        probs = sub.softmax(dim=-1)
        remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
        remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
        return sub.masked_fill(remove, -math.inf)

    return _update_rows(scores, on, cut)


def _apply_typical(scores: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """TypicalLogitsWarper: keep the tokens closest to the entropy, up to typical_p of the mass."""
    on = [i for i, p in enumerate(params) if p.sampling_typical_p is not None]
    if not on:
        return scores
    mass = _column([params[i].sampling_typical_p for i in on], scores)  # type: ignore[misc]

    def typical(sub: Tensor) -> Tensor:  # (P, V)
        normalized = torch.log_softmax(sub, dim=-1)
        entropy = -(normalized * normalized.exp()).nansum(-1, keepdim=True)
        shifted = torch.abs(-normalized - entropy)
        sorted_scores, sorted_indices = torch.sort(shifted, descending=False)
        cumulative = sub.gather(-1, sorted_indices).softmax(dim=-1).cumsum(dim=-1)
        last = (cumulative < mass).sum(dim=1).clamp_(max=sub.shape[-1] - 1)
        remove = sorted_scores > sorted_scores.gather(1, last.view(-1, 1))
        remove[..., :1] = False
        return sub.masked_fill(remove.scatter(1, sorted_indices, remove), -math.inf)

    return _update_rows(scores, on, typical)


def apply_penalties(scores: Tensor, rows: Sequence[RowSampler]) -> Tensor:
    """What applies to every row, greedy ones included: repetition, presence/frequency, suppression."""
    scores = apply_repetition_penalty(scores, rows)
    scores = apply_presence_frequency(scores, rows)
    return apply_suppression(scores, rows)


def apply_warpers(scores: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """Temperature, top-k, top-p, min-p, typical: transformers' sampling warpers, in its order."""
    scores = _apply_temperature(scores, params)
    scores = _apply_top_k(scores, params)
    scores = _apply_top_p(scores, params)
    scores = _apply_min_p(scores, params)
    return _apply_typical(scores, params)
