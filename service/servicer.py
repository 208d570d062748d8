"""The two loramux.v1 services: each RPC converts the request, calls the runtime, converts the result.

Request ids, the replica id, authorization (service/auth.py), error statuses, access logs and request metrics
come from the ``rpc.unary`` / ``rpc.streaming`` wrappers; Generate checks its routing metadata (service/routing.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc

from loramux.service import convert, routing, rpc
from loramux.service.auth import BearerTokens
from loramux.service.calls import CallLog, RequestObserver
from loramux.service.runtime import Runtime
from loramux.v1 import adapter_service_pb2 as apb
from loramux.v1 import adapter_service_pb2_grpc as apb_grpc
from loramux.v1 import generation_service_pb2 as gpb
from loramux.v1 import generation_service_pb2_grpc as gpb_grpc

Context: TypeAlias = grpc.aio.ServicerContext


class _Servicer:
    """The runtime both services call, and what the rpc.unary/streaming wrappers read (rpc.Servicer)."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        observer: RequestObserver | None = None,
        tokens: BearerTokens | None = None,
        replica: str = "",
    ) -> None:
        self._runtime = runtime
        self.limits = runtime.limits
        self.observer = observer
        self.tokens = tokens
        self.replica = replica


class AdapterServicer(_Servicer, apb_grpc.AdapterServiceServicer):
    @rpc.unary
    async def LoadAdapter(
        self, request: apb.LoadAdapterRequest, context: Context, call: CallLog
    ) -> apb.LoadAdapterResponse:
        result = await self._runtime.load_adapter(convert.load_request(request))
        return convert.load_response(result)

    @rpc.unary
    async def UnloadAdapter(
        self, request: apb.UnloadAdapterRequest, context: Context, call: CallLog
    ) -> apb.UnloadAdapterResponse:
        name = convert.adapter_name(request.name)
        info = await self._runtime.unload_adapter(name, allow_missing=request.allow_missing)
        return convert.unload_response(info)

    @rpc.unary
    async def SetAdapter(
        self, request: apb.SetAdapterRequest, context: Context, call: CallLog
    ) -> apb.SetAdapterResponse:
        info, previous = await self._runtime.set_default(convert.default_adapter_name(request.name))
        return convert.set_response(info, previous)

    @rpc.unary
    async def GetAdapter(
        self, request: apb.GetAdapterRequest, context: Context, call: CallLog
    ) -> apb.GetAdapterResponse:
        info = await self._runtime.get_adapter(convert.adapter_name(request.name))
        return apb.GetAdapterResponse(adapter=convert.adapter(info))

    @rpc.unary
    async def ListAdapters(
        self, request: apb.ListAdaptersRequest, context: Context, call: CallLog
    ) -> apb.ListAdaptersResponse:
        infos, default = await self._runtime.list_adapters()
        return convert.list_response(request, infos, default)


class GenerationServicer(_Servicer, gpb_grpc.GenerationServiceServicer):
    @rpc.streaming
    async def Generate(
        self, request: gpb.GenerateRequest, context: Context, call: CallLog
    ) -> AsyncIterator[gpb.GenerateResponse]:
        generation = convert.generation_request(request, request_id=call.request_id)
        headers = routing.adapter_headers(context.invocation_metadata())
        routing.check_body(headers, request)
        channel = await self._runtime.submit(generation)
        context.add_done_callback(lambda _: channel.cancel())  # client cancel, deadline, server stop
        call.admitted(channel)
        try:
            routing.check_default(headers, request, channel.adapter)
            await context.send_initial_metadata(call.echo())
            async for event in channel:
                call.record(event)
                yield convert.generate_response(event)
        finally:
            channel.cancel()  # no-op once finished; otherwise frees the engine row within one step

    @rpc.unary
    async def Tokenize(self, request: gpb.TokenizeRequest, context: Context, call: CallLog) -> gpb.TokenizeResponse:
        ids = await self._runtime.tokenize(convert.tokenize_request(request))
        return convert.tokenize_response(ids)
