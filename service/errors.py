"""The one place where failures become gRPC statuses, and where every RPC gets its request id and log line.

Servicer methods are wrapped with ``@unary`` or ``@streaming``. The wrapper resolves the request id, hands the
method a ``CallLog`` to fill in, echoes ``x-request-id`` in the initial metadata of a successful response,
turns any exception into a status (``to_status``: code by core error class, rich details as google.rpc
ErrorInfo / BadRequest / PreconditionFailure / RetryInfo), logs one line per request (and hands the CallLog to
the servicer's ``observer``, the metrics, when there is one), and re-raises ``asyncio.CancelledError``
untouched (swallowing it leaks native memory in grpc aio).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from core.adapter_sources import AdapterSourceForbiddenError, AdapterSourceUnavailableError
from core.errors import (
    AdapterAlreadyExistsError,
    AdapterNotFoundError,
    AdapterSourceNotFoundError,
    CapacityExceededError,
    CorruptAdapterError,
    IncompatibleAdapterError,
    InvalidArgumentError,
    LoramuxError,
    RequestCancelledError,
    ShuttingDownError,
    UnsupportedAdapterError,
)
from core.requests import EventChannel, Finished, GenerationEvent, TokenDelta
from service.auth import BearerTokens, PermissionDeniedError, UnauthenticatedError
from service.config import ERROR_DOMAIN

log = logging.getLogger("loramux.service")
access_log = logging.getLogger("loramux.access")

REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")  # W3C Trace Context
RETRY_DELAY_S = 1


class ModelLoadingError(LoramuxError):
    """The base model is still loading; the service is NOT_SERVING until it is ready."""

    reason = "MODEL_LOADING"


Code = grpc.StatusCode
# Checked in order; the first class that matches wins. Anything else (EngineFailure included) is INTERNAL.
STATUS_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (AdapterNotFoundError, Code.NOT_FOUND),
    (AdapterSourceNotFoundError, Code.NOT_FOUND),
    (AdapterAlreadyExistsError, Code.ALREADY_EXISTS),
    (InvalidArgumentError, Code.INVALID_ARGUMENT),
    (UnsupportedAdapterError, Code.FAILED_PRECONDITION),
    (IncompatibleAdapterError, Code.FAILED_PRECONDITION),
    (CorruptAdapterError, Code.FAILED_PRECONDITION),
    (CapacityExceededError, Code.RESOURCE_EXHAUSTED),
    (ShuttingDownError, Code.UNAVAILABLE),
    (AdapterSourceUnavailableError, Code.UNAVAILABLE),
    (ModelLoadingError, Code.UNAVAILABLE),
    (RequestCancelledError, Code.CANCELLED),
    (AdapterSourceForbiddenError, Code.PERMISSION_DENIED),
    (UnauthenticatedError, Code.UNAUTHENTICATED),
    (PermissionDeniedError, Code.PERMISSION_DENIED),
)

# CapacityExceededError.field (as core sets it) -> the limit's API name (ErrorInfo metadata "limit").
LIMIT_NAMES = {
    "max_adapters": "maxAdapters",
    "queue": "maxQueuedGenerations",
    "input": "maxPromptTokens",
    "stopping.max_new_tokens": "maxTotalTokens",
}

RETRYABLE_LIMITS = frozenset({"maxQueuedGenerations"})  # the others need a smaller request or an operator


def status_code(error: BaseException) -> grpc.StatusCode:
    return next((code for cls, code in STATUS_CODES if isinstance(error, cls)), Code.INTERNAL)


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
    _last_token: float | None = field(default=None, repr=False)

    @classmethod
    def begin(
        cls,
        method: str,
        request: Message,
        context: grpc.aio.ServicerContext,
        *,
        observer: RequestObserver | None = None,
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
        return ((REQUEST_ID_KEY, self.request_id),)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def admitted(self, channel: EventChannel) -> None:
        """Generate was accepted by the engine: what it resolved (the adapter; "" for the bare base model)."""
        self.adapter = channel.adapter or ""
        self.prompt_tokens = channel.prompt_tokens

    def record(self, event: GenerationEvent) -> None:
        if isinstance(event, TokenDelta):
            n = len(event.token_ids)
            if n:
                self._time_tokens(n)
            self.completion_tokens = (self.completion_tokens or 0) + n
        elif isinstance(event, Finished):
            self.adapter = event.adapter or ""
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


@dataclass(frozen=True)
class RichStatus(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def to_status(error: BaseException, *, call: CallLog, limits: Mapping[str, int]) -> RichStatus:
    """The status (code, message, google.rpc details in the trailer) for ``error`` in the RPC ``call``."""
    code = status_code(error)
    known = isinstance(error, LoramuxError) and code is not Code.INTERNAL
    if known:
        assert isinstance(error, LoramuxError)
        reason, message, field_name = error.reason, error.message, error.field
        problems, extra = error.problems, error.metadata
    else:
        reason, message, field_name = "INTERNAL", f"internal error (request id {call.request_id})", None
        problems, extra = (), {}
    metadata = {"requestId": call.request_id}
    if call.adapter:
        metadata["adapter"] = call.adapter
    if call.source:
        metadata["source"] = call.source
    details: list[Message] = []
    if code is Code.INVALID_ARGUMENT:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field_name or "request", description=message)
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    elif code is Code.FAILED_PRECONDITION:
        details.append(_precondition_failure(reason, call.adapter or "", problems or (message,)))
    elif code is Code.RESOURCE_EXHAUSTED:
        limit = LIMIT_NAMES.get(field_name or "", field_name or "unknown")
        metadata["limit"] = limit
        if limit in limits:
            metadata["limitValue"] = str(limits[limit])
        if limit in RETRYABLE_LIMITS:
            details.append(_retry_info())
    elif code is Code.UNAVAILABLE:
        details.append(_retry_info())
    metadata.update(extra)
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
    status = rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=message, details=[_pack(d) for d in [info, *details]])
    )
    return RichStatus(status.code, status.details, (*status.trailing_metadata, *call.echo()))


def _precondition_failure(reason: str, subject: str, problems: Sequence[str]) -> Message:
    Violation = error_details_pb2.PreconditionFailure.Violation
    return error_details_pb2.PreconditionFailure(
        violations=[Violation(type=reason, subject=subject, description=p) for p in problems]
    )


def _retry_info() -> Message:
    return error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=RETRY_DELAY_S))


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _cancel_status(context: grpc.aio.ServicerContext) -> str:
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"


async def _abort(context: grpc.aio.ServicerContext, error: Exception, call: CallLog, limits: Mapping[str, int]):
    status = to_status(error, call=call, limits=limits)
    if status.code is Code.INTERNAL:
        log.error("request %s (%s) failed", call.request_id, call.method, exc_info=error)
    call.finish(status.code.name)
    await context.abort_with_status(status)


class Servicer(Protocol):
    """What the wrappers need from a servicer: the limits quoted in RESOURCE_EXHAUSTED details, who is told
    of each finished RPC (None: nobody), and the bearer tokens every call must present (None: no auth)."""

    limits: Mapping[str, int]
    observer: RequestObserver | None
    tokens: BearerTokens | None


def _authorize(servicer: Servicer, method: str, context: grpc.aio.ServicerContext) -> None:
    if servicer.tokens is not None:
        servicer.tokens.check(method, context.invocation_metadata() or ())


S = TypeVar("S", bound=Servicer)
Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
Context: TypeAlias = grpc.aio.ServicerContext


def unary(
    method: Callable[[S, Req, Context, CallLog], Awaitable[Resp]],
) -> Callable[[S, Req, Context], Awaitable[Resp]]:
    """Wrap a unary servicer method: request id, status mapping, initial metadata, access log."""

    @functools.wraps(method)
    async def handler(self: S, request: Req, context: Context) -> Resp:
        call = CallLog.begin(method.__name__, request, context, observer=self.observer)
        try:
            _authorize(self, method.__name__, context)
            response = await method(self, request, context, call)
            await context.send_initial_metadata(call.echo())
        except asyncio.CancelledError:
            call.finish(_cancel_status(context))
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, call, self.limits)
            raise  # abort_with_status always raises; this is for the type checker
        call.finish("OK")
        return response

    return handler


def streaming(
    method: Callable[[S, Req, Context, CallLog], AsyncIterator[Resp]],
) -> Callable[[S, Req, Context], AsyncIterator[Resp]]:
    """Wrap a server-streaming servicer method (an async generator) the same way as ``unary``."""

    @functools.wraps(method)
    async def handler(self: S, request: Req, context: Context) -> AsyncIterator[Resp]:
        call = CallLog.begin(method.__name__, request, context, observer=self.observer)
        status = "CANCELLED"  # unless something below decides otherwise
        try:
            _authorize(self, method.__name__, context)
            async for response in method(self, request, context, call):
                yield response
            status = "OK"
        except asyncio.CancelledError:
            status = _cancel_status(context)
            raise
        except grpc.aio.AbortError:
            status = "ABORTED"
            raise
        except Exception as exc:
            status = ""  # _abort logs
            await _abort(context, exc, call, self.limits)
        finally:
            if status:
                call.finish(status)

    return handler
