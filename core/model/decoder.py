"""What the engine calls for a decode step's logits: the lean step where it covers the batch, else the forward."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from loramux.core.model.decode_step import decode_step_for, forward_logits
from loramux.core.model.native_layer_choice import NativeLayerChoice, attach_native_layers
from loramux.core.model.native_layers import DecodeLayers
from loramux.core.model.ragged_attention import Segment


class Decoder:
    """A decode step's logits (N, V): by the model's ``LlamaDecodeStep`` when it has one (``lean``, and
    ``decode_step_for`` found it exact) and it covers the active plan's routes, else by the model's forward;
    the step's layers native where ``attach_native_layers`` gave it them."""

    def __init__(
        self, model: Any, *, lean: bool, layers: DecodeLayers = DecodeLayers.AUTO, rows: tuple[int, ...] = (1,)
    ) -> None:
        """layers, rows: where the step runs native layers (native_layer_choice.py; ``rows``: to time at)."""
        self.model = model
        self.step = decode_step_for(model) if lean else None
        self.native_choice: NativeLayerChoice | str = "no lean decode step"  # or why there is none
        if self.step is not None:
            self.native_choice = attach_native_layers(model, self.step, mode=layers, rows=rows)

    def __call__(
        self,
        ids: Tensor,
        *,
        positions: Tensor,
        mask: Tensor,
        cache: Any,
        segments: list[Segment] | None,
        routes: Mapping[str, Any],
    ) -> Tensor:
        """ids, positions (N, 1); mask (N, S) with the new column; segments: ragged runs (passed to the forward
        only when given)."""
        if self.step is not None and self.step.covers(routes):
            return self.step(ids, positions=positions, mask=mask, cache=cache, segments=segments, routes=routes)
        return forward_logits(self.model, ids, positions=positions, mask=mask, cache=cache, segments=segments)
