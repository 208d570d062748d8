"""What a route is: how one wrapped module computes its output for the rows of a routing plan."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class Route:
    def forward(self, base_layer: nn.Module, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        """The module's output for x; args/kwargs are the extra arguments of the base module's call."""
        raise NotImplementedError

    def compact(self, moves: Sequence[tuple[int, int]], rows: int) -> None:
        """In place: row dst takes row src's routing for each (dst, src) in moves, then keep the first
        ``rows`` rows. Routes without per-row state need nothing."""

    def release(self) -> None:
        """The plan holding this route is dropped; routes that lease buffers give them back. Default: nothing."""
