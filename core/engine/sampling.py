"""Per-row next-token selection for a batch whose rows each carry their own sampling parameters.

The math is transformers' ``generate`` for the same settings, in the same order
(``GenerationMixin._get_logits_processor``; the processors are in processors.py): the penalties (repetition
over prompt + generated ids; OpenAI's presence and frequency over the completion) and the suppression of EOS
and stop ids before min_new_tokens, then, when sampling, temperature, top-k, top-p, min-p and typical
(``min_tokens_to_keep=1``), then a draw from the softmax. Greedy is an argmax after the penalties and the
suppression, which apply in greedy decoding too.

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
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from loramux.core.engine.processors import apply_penalties, apply_warpers, index
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

    temperature: None or 0 selects greedy decoding (top_k, top_p, min_p, typical_p are then ignored, as with
    ``do_sample=False`` in transformers). top_k: 0 means off. top_p: in (0, 1]; 1 means off.
    repetition_penalty: > 0; 1 means off. presence_penalty, frequency_penalty: in [-2, 2]; 0 means off.
    min_p: in [0, 1]; 0 means off. typical_p: in (0, 1]; 1 means off. seed: 0 .. 2**64-1; None picks a
    random one per request.
    """

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_p: float | None = None
    typical_p: float | None = None

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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None and not -2 <= _check_finite(value, f"sampling.{name}") <= 2:
                raise _bad(f"sampling.{name}", value, "must be in [-2, 2]")
        if self.min_p is not None and not 0 <= _check_finite(self.min_p, "sampling.min_p") <= 1:
            raise _bad("sampling.min_p", self.min_p, "must be in [0, 1]")
        if self.typical_p is not None and not 0 < _check_finite(self.typical_p, "sampling.typical_p") <= 1:
            raise _bad("sampling.typical_p", self.typical_p, "must be in (0, 1]")

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

    @property
    def sampling_min_p(self) -> float | None:
        return None if self.greedy or not self.min_p else float(self.min_p)

    @property
    def sampling_typical_p(self) -> float | None:
        p = self.typical_p
        return None if self.greedy or p is None or p >= 1.0 else float(p)

    @property
    def counts_penalty(self) -> bool:
        """Presence or frequency penalty on (they read the completion's token counts)."""
        return bool(self.presence_penalty) or bool(self.frequency_penalty)


def _bad(field: str, value: object, rule: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{field} {rule}, got {value!r}", field=field)


class RowSampler:
    """Per-request sampling state: parameters, own random generator, the ids seen (repetition penalty), the
    completion's token counts (presence and frequency penalties), and what to suppress until when.

    ``prompt_ids`` count for the repetition penalty, as in transformers for decoder-only models; only
    generated ids count for presence and frequency, as in OpenAI's API. ``suppressed`` (EOS and stop token
    ids) get -inf until ``min_new_tokens`` tokens are chosen. The tensors are built lazily at the first step,
    when the vocabulary size and device are known.
    """

    def __init__(
        self,
        params: SamplingParams,
        *,
        prompt_ids: Sequence[int] = (),
        min_new_tokens: int = 0,
        suppressed: frozenset[int] = frozenset(),
    ) -> None:
        self.params = params
        self.seed: int = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        self._penalty = params.penalty
        # Ids recorded before the mask exists; dropped once folded into it. Kept only when penalized.
        self._pending: list[int] = list(prompt_ids) if self._penalty is not None else []
        self._seen: Tensor | None = None  # (V,) bool
        self._pending_generated: list[int] = []
        self._counts: Tensor | None = None  # (V,) float: how often the completion holds each id
        self.step = 0  # tokens chosen for this request so far (counted while they matter: see plain_greedy)
        self._min_new, self.suppressed = min_new_tokens, suppressed

    @property
    def suppressing(self) -> bool:
        return self.step < self._min_new and bool(self.suppressed)

    @property
    def plain_greedy(self) -> bool:
        """Greedy without penalties or suppression: its token is the raw argmax, shared with other such rows."""
        return self.params.greedy and self._penalty is None and not self.params.counts_penalty and not self.suppressing

    def observe(self, token_ids: Tensor | Sequence[int] | int) -> None:
        """Record tokens appended to the completion (``sample_next_tokens`` does this for its picks, with a
        device tensor: no host sync once the state tensors exist)."""
        device = self._seen.device if self._seen is not None else None
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=device).reshape(-1)
        self.step += ids.numel()
        if self._penalty is not None:
            if self._seen is None:
                self._pending.extend(ids.tolist())
            else:
                self._mark(ids.to(self._seen.device))
        if self.params.counts_penalty:
            if self._counts is None:
                self._pending_generated.extend(ids.tolist())
            else:
                self._count(ids.to(self._counts.device))

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

    def generated_counts(self, *, vocab_size: int, device: torch.device) -> Tensor:
        """(V,) float: how many times the completion holds each id."""
        if self._counts is None:
            self._counts = torch.zeros(vocab_size + 1, dtype=torch.float32, device=device)
            self._count(torch.tensor(self._pending_generated, dtype=torch.long, device=device))
            self._pending_generated = []
        elif self._counts.device != device:
            self._counts = self._counts.to(device)
        return self._counts[:vocab_size]

    def _mark(self, ids: Tensor) -> None:
        assert self._seen is not None
        vocab_plus_one = self._seen.shape[0]
        self._seen.index_fill_(0, ids.clamp(max=vocab_plus_one - 1), True)

    def _count(self, ids: Tensor) -> None:
        assert self._counts is not None
        ids = ids.clamp(max=self._counts.shape[0] - 1)
        self._counts.index_add_(0, ids, torch.ones(ids.shape, dtype=self._counts.dtype, device=ids.device))

    def draw_uniform(self) -> float:
        """One U[0, 1) number from this row's own generator: the only randomness a step consumes."""
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))


def process_logits(logits: Tensor, rows: Sequence[RowSampler]) -> Tensor:
    """(N, V) -> (N, V) float32 scores, what transformers' processor list yields for each row's settings."""
    scores = apply_penalties(logits.float(), rows)  # generate() processes float32 copies of the logits
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
    """(M, V) -> (M,) for rows that need processing: penalties, then argmax or warp-and-draw."""
    scores = apply_penalties(logits.float(), rows)
    out = scores.argmax(dim=-1)  # (M,), already right for greedy rows
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        idx = index(sampled, logits.device)
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
        idx = index(plain, logits.device)
        out[idx] = logits[idx].argmax(dim=-1)
    rest = [i for i, r in enumerate(rows) if not r.plain_greedy]
    idx = index(rest, logits.device)
    picked = _pick(logits[idx], [rows[i] for i in rest])  # (M,)
    out[idx] = picked
    for j, i in enumerate(rest):
        rows[i].observe(picked[j : j + 1])  # device tensor: no host sync
    return out
