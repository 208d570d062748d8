"""Per-row next-token selection for a batch whose rows each carry their own sampling parameters.

The math is transformers' ``generate`` for the same settings, in the same order
(``GenerationMixin._get_logits_processor``): repetition penalty over prompt + generated ids, then, when
sampling, temperature, top-k and top-p (``min_tokens_to_keep=1``), then a draw from the softmax. Greedy is an
argmax, after the repetition penalty, which transformers applies in greedy decoding too.

Reproducibility does not depend on batch composition: every request owns a CPU ``torch.Generator`` seeded from
its seed and each sampled row draws exactly one uniform number per step from its own generator. The draw is an
inverse-CDF lookup over the row's probabilities, done for all sampled rows in one batched ``searchsorted``:
the same distribution as ``torch.multinomial``, without one kernel launch and generator per row on the device.

``sample_next_tokens`` is the engine's hot path: rows that are greedy without penalty (the common case) share
one argmax; the rest are processed batched, each with its own parameters as per-row tensors.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from loramux.core.errors import InvalidArgumentError

_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_finite(value: object, field: str) -> float:
    if not _is_number(value):
        raise InvalidArgumentError(f"{field} must be a number, got {value!r}", field=field)
    if not math.isfinite(value):  # type: ignore[arg-type]
        raise InvalidArgumentError(f"{field} must be finite, got {value!r}", field=field)
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. ``None`` means the setting is off.

    temperature: None or 0 selects greedy decoding (top_k / top_p are then ignored, as with
    ``do_sample=False`` in transformers). top_k: 0 means off. top_p: in (0, 1]; 1 means off.
    repetition_penalty: > 0; 1 means off. seed: 0 .. 2**64-1; None picks a random one per request.
    """

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise InvalidArgumentError naming the first bad field (``sampling.<name>``)."""
        if self.temperature is not None:
            if _check_finite(self.temperature, "sampling.temperature") < 0:
                raise _bad("sampling.temperature", self.temperature, "must be >= 0")
        if self.top_k is not None:
            if not isinstance(self.top_k, int) or isinstance(self.top_k, bool):
                raise _bad("sampling.top_k", self.top_k, "must be an integer")
            if self.top_k < 0:
                raise _bad("sampling.top_k", self.top_k, "must be >= 0")
        if self.top_p is not None:
            if not 0 < _check_finite(self.top_p, "sampling.top_p") <= 1:
                raise _bad("sampling.top_p", self.top_p, "must be in (0, 1]")
        if self.repetition_penalty is not None:
            if _check_finite(self.repetition_penalty, "sampling.repetition_penalty") <= 0:
                raise _bad("sampling.repetition_penalty", self.repetition_penalty, "must be > 0")
        if self.seed is not None:
            if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= _MAX_SEED:
                raise _bad("sampling.seed", self.seed, f"must be an integer in [0, {_MAX_SEED}]")

    @property
    def greedy(self) -> bool:
        return self.temperature is None or self.temperature == 0

    @property
    def penalty(self) -> float | None:
        """The repetition penalty to apply, or None when it is off (transformers skips 1.0 too)."""
        rp = self.repetition_penalty
        return None if rp is None or rp == 1.0 else float(rp)

    @property
    def sampling_temperature(self) -> float | None:
        """The temperature divisor when sampling, or None when it is a no-op (1.0, or greedy)."""
        t = self.temperature
        return None if self.greedy or t == 1.0 else float(t)  # type: ignore[arg-type]

    @property
    def sampling_top_k(self) -> int | None:
        return None if self.greedy or not self.top_k else self.top_k

    @property
    def sampling_top_p(self) -> float | None:
        p = self.top_p
        return None if self.greedy or p is None or p >= 1.0 else float(p)


def _bad(field: str, value: object, rule: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{field} {rule}, got {value!r}", field=field)


class RowSampler:
    """Per-request sampling state: parameters, own random generator, ids seen (for repetition penalty).

    ``prompt_ids`` count for the repetition penalty, as in transformers for decoder-only models. The seen-ids
    mask is built lazily at the first step because only then are the vocabulary size and device known.
    """

    def __init__(self, params: SamplingParams, *, prompt_ids: Sequence[int] = ()) -> None:
        self.params = params
        self.seed: int = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        self._penalty = params.penalty
        # Ids recorded before the mask exists; dropped once folded into it. Kept only when penalized.
        self._pending: list[int] = list(prompt_ids) if self._penalty is not None else []
        self._seen: Tensor | None = None  # (V,) bool

    @property
    def plain_greedy(self) -> bool:
        """Greedy without penalty: its token is the raw argmax, shared with other such rows."""
        return self.params.greedy and self._penalty is None

    def observe(self, token_ids: Tensor | Sequence[int] | int) -> None:
        """Record tokens appended to the sequence (``sample_next_tokens`` does this for its picks)."""
        if self._penalty is None:
            return  # nothing reads the history
        if self._seen is None:
            if isinstance(token_ids, Tensor):
                token_ids = token_ids.reshape(-1).tolist()
            self._pending.extend([token_ids] if isinstance(token_ids, int) else token_ids)
            return
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self._seen.device).reshape(-1)
        self._mark(ids)

    def seen_mask(self, *, vocab_size: int, device: torch.device) -> Tensor:
        """(V,) bool: True for every id in prompt + generated tokens."""
        if self._seen is None:
            # One extra slot absorbs ids >= V (the embedding can be larger than lm_head), as transformers does.
            self._seen = torch.zeros(vocab_size + 1, dtype=torch.bool, device=device)
            self._mark(torch.tensor(self._pending, dtype=torch.long, device=device))
            self._pending = []
        elif self._seen.device != device:
            self._seen = self._seen.to(device)
        return self._seen[:vocab_size]

    def _mark(self, ids: Tensor) -> None:
        assert self._seen is not None
        vocab_plus_one = self._seen.shape[0]
        self._seen.index_fill_(0, ids.clamp(max=vocab_plus_one - 1), True)

    def draw_uniform(self) -> float:
        """One U[0, 1) number from this row's own generator: the only randomness a step consumes."""
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))


def _index(rows: Sequence[int], device: torch.device) -> Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _column(values: Sequence[float], like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)  # (M, 1)


def _update_rows(scores: Tensor, rows: Sequence[int], fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn`` applied to the listed rows of (N, V) ``scores``; the whole tensor at once when all are listed."""
    if len(rows) == scores.shape[0]:
        return fn(scores)
    idx = _index(rows, scores.device)
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
    kth = top.gather(1, _index([max(k, 1) - 1 for k in ks], scores.device).unsqueeze(1))  # (M, 1)
    kth = kth.masked_fill(_index(ks, scores.device).unsqueeze(1) == 0, -math.inf)  # off: keep everything
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


def apply_warpers(scores: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """Temperature, top-k, top-p: transformers' sampling warpers, in its order. Greedy rows pass unchanged."""
    scores = _apply_temperature(scores, params)
    scores = _apply_top_k(scores, params)
    return _apply_top_p(scores, params)


def process_logits(logits: Tensor, rows: Sequence[RowSampler]) -> Tensor:
    """(N, V) -> (N, V) float32 scores, what transformers' processor list yields for each row's settings."""
    scores = logits.float()  # generate() processes float32 copies of the logits
    scores = apply_repetition_penalty(scores, rows)
    return apply_warpers(scores, [r.params for r in rows])


def _draw(scores: Tensor, uniforms: Tensor, *, fallback: Tensor) -> Tensor:
    """(M, V) scores, (M,) U[0,1) -> (M,) ids by inverse CDF: id i with probability softmax(scores)[i]."""
    cdf = scores.softmax(dim=-1).cumsum(dim=-1)  # (M, V), nondecreasing
    total = cdf[:, -1:]  # (M, 1), ~1
    # Strictly below the total, so the pick is a token with probability > 0 (cdf steps up there).
    target = torch.minimum(uniforms.to(cdf.dtype).unsqueeze(1) * total, torch.nextafter(total, cdf.new_zeros(())))
    picked = torch.searchsorted(cdf, target, right=True).squeeze(1)  # (M,)
    # A degenerate row (NaN, e.g. a temperature so small that logits overflow) takes ``fallback``: the
    # argmax before warping, the limit of temperature -> 0.
    ok = torch.isfinite(total.squeeze(1)) & (total.squeeze(1) > 0)
    return torch.where(ok, picked.clamp(max=scores.shape[-1] - 1), fallback)


def _pick(logits: Tensor, rows: Sequence[RowSampler]) -> Tensor:
    """(M, V) -> (M,) for rows that need processing: penalty, then argmax or warp-and-draw."""
    scores = apply_repetition_penalty(logits.float(), rows)
    out = scores.argmax(dim=-1)  # (M,), already right for greedy rows
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        idx = _index(sampled, logits.device)
        warped = apply_warpers(scores[idx], [rows[i].params for i in sampled])
        uniforms = torch.tensor([rows[i].draw_uniform() for i in sampled], dtype=torch.float64)
        out[idx] = _draw(warped, uniforms.to(logits.device), fallback=out[idx])
    return out


def sample_next_tokens(logits: Tensor, rows: Sequence[RowSampler]) -> Tensor:
    """(N, V) last-position logits, one RowSampler per row -> (N,) long next-token ids.

    Records each pick in its row (``observe``) so the repetition penalty of the next step sees it.
    """
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
    plain = [i for i, r in enumerate(rows) if r.plain_greedy]
    if len(plain) == len(rows):
        return logits.argmax(dim=-1)  # fast path: the whole batch is plain greedy
    out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    if plain:
        idx = _index(plain, logits.device)
        out[idx] = logits[idx].argmax(dim=-1)
    rest = [i for i, r in enumerate(rows) if not r.plain_greedy]
    idx = _index(rest, logits.device)
    picked = _pick(logits[idx], [rows[i] for i in rest])  # (M,)
    out[idx] = picked
    for j, i in enumerate(rest):
        rows[i].observe(picked[j : j + 1])  # device tensor: no host sync
    return out
