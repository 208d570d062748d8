"""The wrappers every servicer method goes through: request id, authorization, status mapping, access log.

Servicer methods are wrapped with ``@unary`` or ``@streaming``. The wrapper starts the call's ``CallLog``,
checks the bearer token (when the server requires one), echoes ``x-request-id`` in the initial metadata of a
successful response, turns any exception into a status (``status.to_status``), logs one line per request
(and hands the CallLog to the servicer's ``observer``, the metrics, when there is one), and re-raises
``asyncio.CancelledError`` untouched (swallowing it leaks native memory in grpc aio).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Protocol, TypeAlias, TypeVar

import grpc
from google.protobuf.message import Message

from loramux.service.auth import BearerTokens
from loramux.service.calls import CallLog, RequestObserver
from loramux.service.status import Code, to_status

log = logging.getLogger("loramux.service")


# A client's deadline fires on the client, which cancels the call: the cancel reaches the server a transit time
# before the server's own copy of the deadline (counted from when the request arrived). A cancel that close to
# the deadline is the deadline (for the access log and metrics; the client saw DEADLINE_EXCEEDED).
DEADLINE_SLACK_S = 0.5


def _cancel_status(context: grpc.aio.ServicerContext) -> str:
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= DEADLINE_SLACK_S else "CANCELLED"


async def _abort(context: grpc.aio.ServicerContext, error: Exception, call: CallLog, limits: Mapping[str, int]):
    status = to_status(error, call=call, limits=limits)
    if status.code is Code.INTERNAL:
        log.error("request %s (%s) failed", call.request_id, call.method, exc_info=error)
    call.finish(status.code.name)
    await context.abort_with_status(status)


class Servicer(Protocol):
    """What the wrappers need from a servicer: the limits quoted in RESOURCE_EXHAUSTED details, who is told
    of each finished RPC (None: nobody), the bearer tokens every call must present (None: no auth), and the
    replica id every response names ("": none)."""

    @property
    def limits(self) -> Mapping[str, int]: ...

    @property
    def observer(self) -> RequestObserver | None: ...

    @property
    def tokens(self) -> BearerTokens | None: ...

    @property
    def replica(self) -> str: ...


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
        call = CallLog.begin(method.__name__, request, context, observer=self.observer, replica=self.replica)
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
        call = CallLog.begin(method.__name__, request, context, observer=self.observer, replica=self.replica)
        status = None  # None at the end: the generator was closed (the client went away): cancelled or deadline
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
            if status is None:
                status = _cancel_status(context)
            if status:
                call.finish(status)

    return handler
