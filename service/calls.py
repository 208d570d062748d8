"""What one RPC did: its request id, adapter, tokens and timings, for its access-log line, metrics and errors.

The request id comes from the request's own ``request_id`` field, else the ``x-request-id`` metadata, else a
new UUID; it is echoed in the response's initial metadata (and an error's trailer), beside ``x-loramux-replica``,
the replica that served the call (service/routing.py). A valid W3C ``traceparent`` is kept for the log.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from google.protobuf.message import Message

from loramux.core import EventChannel, Finished, GenerationEvent, TokenDelta
from loramux.service.routing import REPLICA_KEY

log = logging.getLogger("loramux.service")
access_log = logging.getLogger("loramux.access")

REQUEST_ID_KEY = "x-request-id"
MIX_LABEL = "(mix)"  # the adapter of a request that runs with a weighted mix
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")  # W3C Trace Context


def valid_request_id(value: str) -> bool:
    return bool(_REQUEST_ID.fullmatch(value))


class RequestObserver(Protocol):
    """Told of every finished RPC (service/metrics.py); must be quick, on the event loop."""

    def request_finished(self, call: CallLog, status: str) -> None: ...


@dataclass
class CallLog:
    """What one RPC did, for its log line, its metrics and its error details. Filled in by the servicer method."""

    method: str
    request_id: str
    adapter: str | None = None  # the adapter the request names (once Generate is admitted: the one it runs with)
    source: str | None = None  # LoadAdapter's source
    traceparent: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    started: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None  # Generate: seconds from the start to the first token
    token_gaps: list[float] = field(default_factory=list, repr=False)  # Generate: seconds between tokens
    observer: RequestObserver | None = field(default=None, repr=False)
    replica: str = ""  # echoed as x-loramux-replica ("": not sent)
    _last_token: float | None = field(default=None, repr=False)

    @classmethod
    def begin(
        cls,
        method: str,
        request: Message,
        context: grpc.aio.ServicerContext,
        *,
        observer: RequestObserver | None = None,
        replica: str = "",
    ) -> CallLog:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        own = getattr(request, "request_id", "")
        if own and valid_request_id(own):
            request_id = own
        elif valid_request_id(metadata.get(REQUEST_ID_KEY, "")):
            request_id = metadata[REQUEST_ID_KEY]
        else:
            request_id = str(uuid.uuid4())
        fields = request.DESCRIPTOR.fields_by_name
        adapter = request.adapter if "adapter" in fields and request.HasField("adapter") else None
        traceparent = metadata.get("traceparent", "")
        return cls(
            method=method,
            request_id=request_id,
            adapter=getattr(request, "name", None) or adapter,
            source=getattr(request, "source", None) or None,
            traceparent=traceparent if _TRACEPARENT.fullmatch(traceparent) else None,  # invalid: ignored
            observer=observer,
            replica=replica,
        )

    def log_fields(self, status: str) -> dict[str, str | int | float]:
        """The access-log fields, in order; ``adapter`` is "" for the bare base model."""
        fields: dict[str, str | int | float] = {"rpc": self.method, "request_id": self.request_id, "status": status}
        if self.adapter is not None:
            fields["adapter"] = self.adapter
        if self.prompt_tokens is not None:
            fields["prompt_tokens"] = self.prompt_tokens
        if self.completion_tokens is not None:
            fields["completion_tokens"] = self.completion_tokens
        fields["duration_ms"] = round(self.elapsed * 1000, 1)
        if self.first_token_s is not None:
            fields["ttft_ms"] = round(self.first_token_s * 1000, 1)
        if self.traceparent:
            fields["traceparent"] = self.traceparent
        return fields

    def echo(self) -> tuple[tuple[str, str], ...]:
        """The metadata every response carries: the request id in effect, and the replica."""
        replica = ((REPLICA_KEY, self.replica),) if self.replica else ()
        return ((REQUEST_ID_KEY, self.request_id), *replica)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def admitted(self, channel: EventChannel) -> None:
        """Generate was accepted by the engine: what it resolved (the adapter; "" for the bare base model,
        MIX_LABEL for a weighted mix of adapters)."""
        self.adapter = MIX_LABEL if channel.mix else channel.adapter or ""
        self.prompt_tokens = channel.prompt_tokens

    def record(self, event: GenerationEvent) -> None:
        if isinstance(event, TokenDelta):
            n = len(event.token_ids)
            if n:
                self._time_tokens(n)
            self.completion_tokens = (self.completion_tokens or 0) + n
        elif isinstance(event, Finished):
            self.adapter = MIX_LABEL if event.adapter_mix else event.adapter or ""
            self.prompt_tokens, self.completion_tokens = event.prompt_tokens, event.completion_tokens

    def _time_tokens(self, n: int) -> None:
        now = time.monotonic()
        if self._last_token is None:
            self.first_token_s = now - self.started
        else:
            self.token_gaps.extend([(now - self._last_token) / n] * n)
        self._last_token = now

    def finish(self, status: str) -> None:
        """The request's one access-log line, then the observer (metrics)."""
        fields = self.log_fields(status)
        text = " ".join(f"{k}={_text_value(k, v)}" for k, v in fields.items())
        access_log.info(text, extra={"fields": fields})  # service/logs.py writes the fields as JSON when asked
        if self.observer is not None:
            try:
                self.observer.request_finished(self, status)
            except Exception:
                log.exception("request observer failed for %s", self.request_id)


def _text_value(key: str, value: str | int | float) -> str:
    if key == "adapter":
        return _loggable(str(value)) if value else "(base)"
    return str(value)


def _loggable(value: str) -> str:
    """Client-chosen text in a log line: as is when plain, quoted when it has spaces or control characters."""
    return value if value.isprintable() and " " not in value else repr(value)
