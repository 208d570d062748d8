"""Typed failures of the core. The gRPC edge maps each class to one status code in one place.

Every error carries a machine-readable ``reason`` (UPPER_SNAKE, for google.rpc.ErrorInfo), the request
``field`` it is about when there is one (for google.rpc.BadRequest), and, for adapter rejections, the full
list of ``problems`` so a caller fixes everything in one round trip.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class LoramuxError(Exception):
    """Base class of every error the core raises on purpose."""

    reason = "LORAMUX_ERROR"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        problems: Iterable[str] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        if self.problems:
            message = message + ": " + "; ".join(self.problems)
        super().__init__(message)
        self.message = message
        self.field = field
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgumentError(LoramuxError):
    """A caller-supplied value is malformed (bad adapter name, negative limit, ...)."""

    reason = "INVALID_ARGUMENT"


class AdapterNotFoundError(LoramuxError):
    """No adapter is loaded under that name."""

    reason = "ADAPTER_NOT_FOUND"


class AdapterAlreadyExistsError(LoramuxError):
    """The name is taken by an adapter from another source or revision, and replace was not asked for."""

    reason = "ADAPTER_ALREADY_EXISTS"


class AdapterSourceNotFoundError(LoramuxError):
    """The adapter's files could not be found (local folder, subfolder, Hub repo, revision or cache)."""

    reason = "ADAPTER_SOURCE_NOT_FOUND"


class AdapterSourceUnavailableError(LoramuxError):
    """The source exists in principle but cannot be reached now (Hub outage, network error)."""

    reason = "ADAPTER_SOURCE_UNAVAILABLE"


class AdapterSourceForbiddenError(LoramuxError):
    """The configuration refuses this source (a folder outside the allowed roots, the Hub turned off)."""

    reason = "ADAPTER_SOURCE_FORBIDDEN"


class UnsupportedAdapterError(LoramuxError):
    """adapter_config.json asks for features loramux does not implement (listed in ``problems``)."""

    reason = "ADAPTER_UNSUPPORTED"


class IncompatibleAdapterError(LoramuxError):
    """The adapter does not fit this base model: no matching module, wrong tensor shapes, rank too high."""

    reason = "ADAPTER_INCOMPATIBLE"


class CorruptAdapterError(LoramuxError):
    """The adapter's files are unreadable, truncated, malformed, or hold NaN/Inf weights."""

    reason = "ADAPTER_CORRUPT"


class CapacityExceededError(LoramuxError):
    """A configured limit is reached (adapters resident, queue, batch rows, tokens)."""

    reason = "RESOURCE_EXHAUSTED"


class ShuttingDownError(LoramuxError):
    """The engine no longer accepts requests (draining or closed)."""

    reason = "SHUTTING_DOWN"


class RequestCancelledError(LoramuxError):
    """Ends the event stream of a request that was cancelled."""

    reason = "CANCELLED"


class EngineFailure(LoramuxError):
    """A forward pass failed; every row of that batch is ended with this (details in the server log)."""

    reason = "INTERNAL"
