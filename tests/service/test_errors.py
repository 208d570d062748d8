"""The error choke point as a pure function (every core error class -> code and details), and the edge helpers."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from loramux.core.errors import (
    AdapterAlreadyExistsError,
    AdapterNotFoundError,
    AdapterSourceNotFoundError,
    AdapterSourceUnavailableError,
    CapacityExceededError,
    CorruptAdapterError,
    EngineFailure,
    IncompatibleAdapterError,
    InvalidArgumentError,
    RequestCancelledError,
    ShuttingDownError,
    UnsupportedAdapterError,
)
from loramux.service import pagination
from loramux.service.calls import REQUEST_ID_KEY, CallLog
from loramux.service.errors import ModelLoadingError
from loramux.service.status import to_status
from tests.service.harness import unpack_details

Code = grpc.StatusCode
LIMITS = {"maxQueuedGenerations": 7, "maxAdapters": 3}

TABLE = [
    (AdapterNotFoundError("a"), Code.NOT_FOUND, "ADAPTER_NOT_FOUND"),
    (AdapterSourceNotFoundError("b"), Code.NOT_FOUND, "ADAPTER_SOURCE_NOT_FOUND"),
    (AdapterAlreadyExistsError("c"), Code.ALREADY_EXISTS, "ADAPTER_ALREADY_EXISTS"),
    (InvalidArgumentError("d", field="sampling.top_p"), Code.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    (UnsupportedAdapterError("e", problems=["use_dora"]), Code.FAILED_PRECONDITION, "ADAPTER_UNSUPPORTED"),
    (IncompatibleAdapterError("f", problems=["x", "y"]), Code.FAILED_PRECONDITION, "ADAPTER_INCOMPATIBLE"),
    (CorruptAdapterError("g"), Code.FAILED_PRECONDITION, "ADAPTER_CORRUPT"),
    (CapacityExceededError("h", field="queue"), Code.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"),
    (ShuttingDownError("i"), Code.UNAVAILABLE, "SHUTTING_DOWN"),
    (AdapterSourceUnavailableError("j"), Code.UNAVAILABLE, "ADAPTER_SOURCE_UNAVAILABLE"),
    (ModelLoadingError("k"), Code.UNAVAILABLE, "MODEL_LOADING"),
    (RequestCancelledError("l"), Code.CANCELLED, "CANCELLED"),
    (EngineFailure("m"), Code.INTERNAL, "INTERNAL"),
    (KeyError("n"), Code.INTERNAL, "INTERNAL"),
]


def decode(status) -> tuple[status_pb2.Status, dict[type, object]]:
    rich = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    return rich, unpack_details(rich)


@pytest.mark.parametrize(("error", "code", "reason"), TABLE, ids=[type(e).__name__ for e, _, _ in TABLE])
def test_each_error_class_maps_to_its_code_and_details(error, code, reason):
    call = CallLog(method="X", request_id="rid-1", adapter="math")
    status = to_status(error, call=call, limits=LIMITS)
    rich, found = decode(status)
    assert status.code is code and rich.code == code.value[0] and rich.message == status.details
    info = found[error_details_pb2.ErrorInfo]
    assert info.reason == reason and info.domain == "loramux.dev"
    assert info.metadata["requestId"] == "rid-1" and info.metadata["adapter"] == "math"
    assert dict(status.trailing_metadata)[REQUEST_ID_KEY] == "rid-1"
    assert (error_details_pb2.BadRequest in found) == (code is Code.INVALID_ARGUMENT)
    assert (error_details_pb2.PreconditionFailure in found) == (code is Code.FAILED_PRECONDITION)
    if code is Code.INTERNAL:
        assert status.details == "internal error (request id rid-1)"  # nothing of the exception leaks
    if code is Code.INVALID_ARGUMENT:
        assert found[error_details_pb2.BadRequest].field_violations[0].field == "sampling.top_p"
    if isinstance(error, IncompatibleAdapterError):
        violations = found[error_details_pb2.PreconditionFailure].violations
        assert [(v.type, v.subject, v.description) for v in violations] == [
            ("ADAPTER_INCOMPATIBLE", "math", "x"),
            ("ADAPTER_INCOMPATIBLE", "math", "y"),
        ]
    if code is Code.RESOURCE_EXHAUSTED:
        assert info.metadata["limit"] == "maxQueuedGenerations" and info.metadata["limitValue"] == "7"
        assert found[error_details_pb2.RetryInfo].retry_delay.seconds == 1


def test_page_tokens_round_trip_and_reject_forgeries():
    names = [f"n{i}" for i in range(5)]
    page, token = pagination.paginate(names, names, size=2, token="")
    assert page == ["n0", "n1"] and pagination.decode_token(token) == "n1"
    page, token = pagination.paginate(names, names, size=10, token=token)
    assert page == ["n2", "n3", "n4"] and token == ""
    assert pagination.page_size(0) == 100 and pagination.page_size(5000) == 1000
    for forged in ["abc", "bm90LWEtdG9rZW4", pagination.encode_token("..bad")]:
        with pytest.raises(InvalidArgumentError) as caught:
            pagination.decode_token(forged)
        assert caught.value.field == "page_token"
