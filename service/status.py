"""The one place where failures become gRPC statuses: a code per error class, and rich details.

``to_status`` gives the code by error class (the first match in ``STATUS_CODES``; anything else is INTERNAL,
with a generic message naming the request id) and google.rpc details: ErrorInfo always (domain, reason,
request id, adapter, source, limit), BadRequest for INVALID_ARGUMENT, PreconditionFailure listing every
problem for FAILED_PRECONDITION, RetryInfo where a retry can help.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from loramux.core.errors import (
    AdapterAlreadyExistsError,
    AdapterNotFoundError,
    AdapterSourceForbiddenError,
    AdapterSourceNotFoundError,
    AdapterSourceUnavailableError,
    CapacityExceededError,
    CorruptAdapterError,
    IncompatibleAdapterError,
    InvalidArgumentError,
    LoramuxError,
    RequestCancelledError,
    ShuttingDownError,
    UnsupportedAdapterError,
)
from loramux.service.calls import CallLog
from loramux.service.config import ERROR_DOMAIN
from loramux.service.errors import (
    AdapterMetadataMismatchError,
    ModelLoadingError,
    PermissionDeniedError,
    UnauthenticatedError,
)

RETRY_DELAY_S = 1

Code = grpc.StatusCode
# Checked in order; the first class that matches wins. Anything else (EngineFailure included) is INTERNAL.
STATUS_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (AdapterNotFoundError, Code.NOT_FOUND),
    (AdapterSourceNotFoundError, Code.NOT_FOUND),
    (AdapterAlreadyExistsError, Code.ALREADY_EXISTS),
    (InvalidArgumentError, Code.INVALID_ARGUMENT),
    (AdapterMetadataMismatchError, Code.INVALID_ARGUMENT),
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
    "max_adapter_memory": "maxAdapterMemory",
    "max_kv_memory": "maxKvMemory",
    "queue": "maxQueuedGenerations",
    "input": "maxPromptTokens",
    "stopping.max_new_tokens": "maxTotalTokens",
}

RETRYABLE_LIMITS = frozenset({"maxQueuedGenerations"})  # the others need a smaller request or an operator


def status_code(error: BaseException) -> grpc.StatusCode:
    return next((code for cls, code in STATUS_CODES if isinstance(error, cls)), Code.INTERNAL)


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
