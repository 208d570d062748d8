"""``--decode-layers``: whether the decode step runs its layers' small ops in C (native_layers.py), decided at start.

Native layers agree with the forward's logits to fp32 rounding, not bit for bit, so at engine start they
first pass a probe (``within_tolerance``: three decode steps of padded rows, each within ``TOLERANCE`` of the
forward's logits and with its greedy tokens, one of them in ragged runs), once on the one whole-layer call
of an unrouted layer (which a routed layer also makes, its grouped-kernel adds inside) and once on the staged
calls of a routed one. Then, under ``auto``, the step is timed both ways at each row count the engine will
run (up to native_layers.MAX_ROWS), interleaved, without adapters, and a batch of r rows runs native layers
where they were faster at the nearest timed count at or above r: which is faster depends on the machine, and
it is the whole step that counts (each call trades the torch ops' dispatch for the native kernel's GEMMs).
Routed layers follow the same table (their staged calls were faster too on the Intel Xeon: 8 distinct
adapters 1.24x, 64 rows over 8 adapters 1.12x; BENCHMARKS "Session 25"). ``native`` keeps them at
every row count without timing; ``torch`` never runs them.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import torch
from torch import Tensor

from loramux.core.model.decode_step import LlamaDecodeStep, probe_step
from loramux.core.model.kv_batch import next_positions, prefill_positions
from loramux.core.model.kv_cache import GrowableCache
from loramux.core.model.native_layers import MAX_ROWS, TOLERANCE, DecodeLayers, native_layers

log = logging.getLogger(__name__)

TIMED_STEPS: Final = 5  # per row count and way, after a warm-up step each, interleaved
PROMPT_TOKENS: Final = 16


@dataclass(frozen=True)
class StepTiming:
    """The median decode step at ``rows`` rows, seconds: with native layers, and with the torch ops."""

    rows: int
    native_s: float
    torch_s: float

    @property
    def native_faster(self) -> bool:
        return self.native_s < self.torch_s


@dataclass(frozen=True)
class NativeLayerChoice:
    """What start measured (none under ``native``) and the table it chose: (rows, native?) by rows."""

    timings: tuple[StepTiming, ...]
    table: tuple[tuple[int, bool], ...]

    def describe(self) -> str:
        if not self.timings:
            return f"native at 1-{MAX_ROWS} rows"
        cells = [f"{t.rows} rows {t.torch_s / t.native_s:.2f}x" for t in self.timings]
        return "native/torch step time: " + ", ".join(cells)


def within_tolerance(forward: Tensor, step: Tensor) -> bool:
    """step's logits (N, V) within TOLERANCE of the forward's largest magnitude (at least 1), same argmax."""
    bound = TOLERANCE * max(1.0, forward.abs().max().item())
    return (forward - step).abs().max().item() <= bound and torch.equal(forward.argmax(-1), step.argmax(-1))


def attach_native_layers(
    model: Any, step: LlamaDecodeStep, *, mode: DecodeLayers, rows: Sequence[int]
) -> NativeLayerChoice | str:
    """Give the step native layers where ``mode`` and the probe (and under auto, timing at ``rows``) allow;
    returns the choice, or why it has none (logged either way)."""
    if mode is DecodeLayers.TORCH:
        return _none("--decode-layers torch")
    layers = native_layers(model)
    if isinstance(layers, str):
        return _none(layers)
    step.native = layers
    layers.table = ((MAX_ROWS, True),)  # on at every row count while probed
    try:  # both the two calls of an unrouted layer and the staged calls a routed layer makes
        problem = probe_step(model, step, close=within_tolerance)
        layers.staged = True
        problem = problem or probe_step(model, step, close=within_tolerance)
    except Exception as exc:  # an architecture the native layers read wrongly
        problem = f"{type(exc).__name__}: {exc}"
    finally:
        layers.staged, layers.table = False, ()
    if problem:
        step.native = None
        return _none(problem)
    if mode is DecodeLayers.NATIVE:
        choice = NativeLayerChoice(timings=(), table=((MAX_ROWS, True),))
    else:
        timings = tuple(_time_step(model, step, n) for n in sorted({min(n, MAX_ROWS) for n in rows}))
        choice = NativeLayerChoice(timings=timings, table=tuple((t.rows, t.native_faster) for t in timings))
    layers.table = choice.table
    log.info("decode layers: %s", choice.describe())
    return choice


def _none(why: str) -> str:
    log.info("decode layers run torch's ops: %s", why)
    return why


def _time_step(model: Any, step: LlamaDecodeStep, rows: int) -> StepTiming:
    """Decode steps of ``rows`` rows on one cache, native layers on and off in turn (medians, seconds)."""
    layers = step.native
    assert layers is not None
    device = next(model.parameters()).device
    mask = torch.ones(rows, PROMPT_TOKENS, dtype=torch.long, device=device)
    ids = torch.arange(rows * PROMPT_TOKENS, device=device).view(rows, -1) % model.config.vocab_size
    cache = GrowableCache()
    seconds: dict[bool, list[float]] = {True: [], False: []}
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=prefill_positions(mask), past_key_values=cache)
            token = ids[:, -1:]
            for turn in range(2 * (TIMED_STEPS + 1)):
                native = turn % 2 == (turn // 2) % 2  # on, off, off, on, ...: neither way always goes first
                layers.table = ((MAX_ROWS, native),)
                positions = next_positions(mask)
                mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
                start = time.perf_counter()
                step(token, positions=positions, mask=mask, cache=cache, segments=None, routes={})
                if turn >= 2:  # the first of each way warms up
                    seconds[native].append(time.perf_counter() - start)
    finally:
        layers.table = ()
    return StepTiming(rows=rows, native_s=statistics.median(seconds[True]), torch_s=statistics.median(seconds[False]))
