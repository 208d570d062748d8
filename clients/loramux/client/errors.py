"""A failed call as a typed exception: the gRPC status plus loramux's decoded google.rpc details."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(eq=False)
class LoramuxRpcError(Exception):
    """A failed call: the gRPC status plus the loramux error details (ErrorInfo, BadRequest, ...)."""

    code: grpc.StatusCode
    message: str
    reason: str = ""  # ErrorInfo.reason, e.g. ADAPTER_NOT_FOUND ("" when the grpc library failed the call)
    metadata: dict[str, str] = field(default_factory=dict)  # ErrorInfo.metadata (requestId, adapter, limit, ...)
    field_violations: list[tuple[str, str]] = field(default_factory=list)  # BadRequest (field, description)
    precondition_violations: list[tuple[str, str, str]] = field(default_factory=list)  # (type, subject, description)
    retry_after_s: float | None = None  # RetryInfo

    def __str__(self) -> str:
        reason = f" {self.reason}" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> LoramuxRpcError:
        """From a failed call of the sync or the asyncio API (both expose code, details and the trailer)."""
        call: Any = error
        err = cls(code=call.code(), message=call.details() or "")
        try:
            status = rpc_status.from_call(call)
        except ValueError:  # a trailer whose status disagrees with the call's: keep the call's
            status = None
        for detail in status.details if status is not None else ():
            err._absorb(detail)
        return err

    def _absorb(self, detail: Any) -> None:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.PreconditionFailure):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                if isinstance(message, error_details_pb2.ErrorInfo):
                    self.reason, self.metadata = message.reason, dict(message.metadata)
                elif isinstance(message, error_details_pb2.BadRequest):
                    self.field_violations = [(v.field, v.description) for v in message.field_violations]
                else:
                    self.precondition_violations = [(v.type, v.subject, v.description) for v in message.violations]
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            self.retry_after_s = retry.retry_delay.ToTimedelta().total_seconds()
