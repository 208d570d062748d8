"""Decode-step attention that does not read the left padding of shorter rows.

The running batch is left-padded to its longest row (kv_batch.py). When one long prompt joins rows a
few dozen tokens long, every row's keys and values are as wide as the long one, and every decode step's
attention reads all of it: with 8 rows of ~100 tokens beside one of 1.5k, steps went from 7.7 to 22.5 ms
for every stream while the long request ran.

``decode_segments`` splits the batch's rows into contiguous runs of similar length; each run attends to
its own last ``width`` columns, a view of the cache (no copy). Joins append rows at the end and prefill
groups have similar lengths, so the runs are few in practice. ``use_ragged_attention`` registers this as a
transformers attention implementation that is SDPA for everything else (prefill, batches without much
padding), and switches a model that uses SDPA to it. The engine passes the runs of each decode step as the
``loramux_segments`` keyword, which transformers hands through to the attention function.

Results equal SDPA over the padded width to fp32 rounding: masked columns contribute exactly nothing to the
softmax, only the blocking of the sum changes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final

import torch
from torch import Tensor, nn

from loramux.core.model.kv_batch import next_positions, prefill_positions

log = logging.getLogger(__name__)

NAME: Final = "loramux_ragged"
SEGMENTS_KWARG: Final = "loramux_segments"

Segment = tuple[int, int, int]  # (first row, row after the last, columns attended: the last `width`)

# One more attention call costs about as much as reading this many row-columns of keys and values (a call
# ~15 us; a column of K and V at hidden 512, fp32, ~0.13 us at this machine's 30 GB/s)
_CALL_COST: Final = 128


def decode_segments(lengths: Sequence[int], width: int, *, min_saving: float = 0.5) -> list[Segment] | None:
    """Runs of rows for one decode step; lengths[i] is row i's real tokens (the last columns of ``width``).

    Greedy, left to right: a row joins the current run unless attending to the run's widened columns costs
    more than starting a run of its own. None when the runs would save less than ``min_saving`` of one call
    over the full width (a batch without much padding keeps plain SDPA).
    """
    segments: list[Segment] = []
    start, longest = 0, 0
    for i, length in enumerate(lengths):
        rows = i - start
        merged = (rows + 1) * max(longest, length)
        separate = rows * longest + length + _CALL_COST
        if rows and merged > separate:
            segments.append((start, i, longest))
            start, longest = i, 0
        longest = max(longest, length)
    segments.append((start, len(lengths), longest))
    cost = sum((stop - first) * w + _CALL_COST for first, stop, w in segments)
    if len(segments) == 1 or cost > (1 - min_saving) * len(lengths) * width:
        return None
    return segments


def _ragged_sdpa(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments: list[Segment] | None = kwargs.pop(SEGMENTS_KWARG, None)
    if segments is None or query.shape[2] != 1 or attention_mask is None or attention_mask.dim() != 4:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = []
    for first, stop, width in segments:  # query (N, H, 1, D); key, value (N, Hkv, S, D); mask (N, 1, 1, S)
        out, _ = sdpa_attention_forward(
            module,
            query[first:stop],
            key[first:stop, :, -width:],
            value[first:stop, :, -width:],
            attention_mask[first:stop, :, :, -width:],
            **kwargs,
        )
        outputs.append(out)  # (rows, 1, H, D)
    return torch.cat(outputs), None


def use_ragged_attention(model: nn.Module) -> bool:
    """Switch a model whose attention is SDPA to the ragged decode attention (True also when an earlier engine
    on the same model did); False, and the model unchanged, otherwise."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _ragged_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same masks SDPA gets
    try:
        model.set_attn_implementation(NAME)  # type: ignore[operator]
        problem = _probe(model)
    except Exception as exc:  # a model class that refuses custom attention, or one the probe breaks
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        log.info("ragged decode attention not used for %s: %s", type(model).__name__, problem)
        model.set_attn_implementation("sdpa")  # type: ignore[operator]
        return False
    return True


def _probe(model: nn.Module) -> str:
    """'' when one padded decode step with runs gives the logits of one without (the keyword reaches the
    attention, or is dropped harmlessly, in this architecture), else what went wrong."""
    device = next(model.parameters()).device
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], device=device)  # (2, 4): row 0 left-padded
    ids = torch.ones(2, 4, dtype=torch.long, device=device)
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long, device=device)], dim=1)
    step = {"input_ids": ids[:, :1], "attention_mask": step_mask, "position_ids": next_positions(mask)}
    prefill = {"input_ids": ids, "attention_mask": mask, "position_ids": prefill_positions(mask)}
    logits = []
    with torch.no_grad():
        for extra in ({}, {SEGMENTS_KWARG: [(0, 1, 3), (1, 2, 5)]}):
            cache = model(**prefill, use_cache=True).past_key_values
            out = model(**step, past_key_values=cache, use_cache=True, **extra)
            logits.append(out.logits[:, -1].float())
    # the two differ only in how the softmax sums are blocked: fp32 rounding, or half-precision rounding
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    difference = (logits[0] - logits[1]).abs().max().item()
    if not difference <= tolerance * max(1.0, logits[0].abs().max().item()):  # also False for NaN
        return f"a decode step with runs differs from one without by {difference:.3g}"
    return ""
