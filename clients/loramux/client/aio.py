"""The typed asyncio client: the same methods as LoramuxClient, as coroutines, over grpc.aio.

    async with AsyncLoramuxClient("127.0.0.1:50051") as client:
        async for text in client.generate("Prove that", adapter="math", max_new_tokens=64):
            print(text, end="", flush=True)
        await client.load_adapter("poet", "/srv/adapters/poet")

Requests and results are built by the same functions as the sync client's (``messages``); failures raise the
same ``LoramuxRpcError``. Create and use it inside one running event loop (grpc.aio channels are bound to it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loramux.client import messages as wire
from loramux.client.errors import LoramuxRpcError
from loramux.client.events import GenerateEvent, TextChunk
from loramux.client.messages import DEFAULT_TARGET, GenerateOptions, LoadOptions, Messages, MiB
from loramux.v1 import adapter_service_pb2 as apb
from loramux.v1 import adapter_service_pb2_grpc as apb_grpc
from loramux.v1 import generation_service_pb2_grpc as gpb_grpc


class AsyncLoramuxClient:
    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        max_message_bytes: int = 16 * MiB,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """The same options as LoramuxClient."""
        options = wire.channel_options(max_message_bytes)
        self.target = target
        self.timeout = timeout
        self._auth = wire.auth_metadata(token)
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self.channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._adapters = apb_grpc.AdapterServiceStub(self.channel)
        self._generation = gpb_grpc.GenerationServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncLoramuxClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- generation -----------------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> AsyncIterator[str]:
        """Stream the completion's text (``async for``). Same options as ``generate_events``."""
        async for event in self.generate_events(prompt, timeout=timeout, **options):
            if isinstance(event, TextChunk) and event.text:
                yield event.text

    async def generate_events(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> AsyncIterator[GenerateEvent]:
        """TextChunk events, then one Completion (``async for``). Leaving the loop early cancels the generation."""
        request = wire.generate_request(prompt, options)
        metadata = (*wire.call_metadata(self._auth, request.request_id), *wire.routing_metadata(request))
        call = self._generation.Generate(request, timeout=self._timeout(timeout), metadata=metadata)
        try:
            async for response in call:
                if response.HasField("finished"):
                    initial = await call.initial_metadata()
                    event = wire.generate_event(response, wire.echoed_request_id(initial), wire.echoed_replica(initial))
                else:
                    event = wire.generate_event(response, "")
                yield event
        except grpc.RpcError as exc:
            raise LoramuxRpcError.from_rpc_error(exc) from None
        finally:
            call.cancel()  # no-op once the stream ended; stops the server's work if the caller broke off

    async def tokenize(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        apply_chat_template: bool = False,
        timeout: float | None = None,
    ) -> list[int]:
        """The token ids a Generate with this prompt (or conversation) would see (their count: ``len``)."""
        request = wire.tokenize_request(prompt, messages=messages, apply_chat_template=apply_chat_template)
        return list((await self._call(self._generation.Tokenize, request, timeout)).token_ids)

    # -- adapters -------------------------------------------------------------------------------------

    async def load_adapter(
        self, name: str, source: str, *, timeout: float | None = None, **options: Unpack[LoadOptions]
    ) -> apb.LoadAdapterResponse:
        return await self._call(self._adapters.LoadAdapter, wire.load_request(name, source, options), timeout)

    async def unload_adapter(
        self, name: str, *, allow_missing: bool = False, timeout: float | None = None
    ) -> apb.Adapter | None:
        request = apb.UnloadAdapterRequest(name=name, allow_missing=allow_missing)
        response = await self._call(self._adapters.UnloadAdapter, request, timeout)
        return response.adapter if response.HasField("adapter") else None

    async def set_adapter(self, name: str, *, timeout: float | None = None) -> apb.SetAdapterResponse:
        return await self._call(self._adapters.SetAdapter, apb.SetAdapterRequest(name=name), timeout)

    async def get_adapter(self, name: str, *, timeout: float | None = None) -> apb.Adapter:
        return (await self._call(self._adapters.GetAdapter, apb.GetAdapterRequest(name=name), timeout)).adapter

    async def list_adapters_page(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> apb.ListAdaptersResponse:
        request = apb.ListAdaptersRequest(page_size=page_size, page_token=page_token)
        return await self._call(self._adapters.ListAdapters, request, timeout)

    async def list_adapters(self, *, page_size: int = 0, timeout: float | None = None) -> list[apb.Adapter]:
        adapters: list[apb.Adapter] = []
        token = ""
        while True:
            page = await self.list_adapters_page(page_size=page_size, page_token=token, timeout=timeout)
            adapters.extend(page.adapters)
            if not (token := page.next_page_token):
                return adapters

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        response = await self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    # -- plumbing -------------------------------------------------------------------------------------

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            metadata = wire.call_metadata(self._auth)
            return await method(request, timeout=self._timeout(timeout), metadata=metadata)
        except grpc.RpcError as exc:
            raise LoramuxRpcError.from_rpc_error(exc) from None
