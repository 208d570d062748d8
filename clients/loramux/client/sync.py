"""The typed synchronous client, over the generated stubs (no dependency on the server's code).

    with LoramuxClient("127.0.0.1:50051") as client:
        for text in client.generate("Prove that", adapter="math", max_new_tokens=64):
            print(text, end="", flush=True)
        client.load_adapter("poet", "/srv/adapters/poet")
        print([a.name for a in client.list_adapters()])

``adapter``: None (the default) uses the server's default adapter, "" the bare base model, a name that adapter.
Failures raise ``LoramuxRpcError`` carrying the status code and the decoded google.rpc details.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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


class LoramuxClient:
    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        max_message_bytes: int = 16 * MiB,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """``timeout``: the default deadline of every call, in seconds (None: no deadline). ``token``: sent as
        ``authorization: Bearer <token>`` on every call, for servers started with --auth-tokens-file. It is
        plain metadata, not call credentials, which grpc refuses on an insecure channel; use TLS (or a trusted
        network) in production. ``credentials``: for a TLS server, e.g.
        ``grpc.ssl_channel_credentials(root_certificates=...)`` (None: a plaintext channel)."""
        options = wire.channel_options(max_message_bytes)
        self.target = target
        self.timeout = timeout
        self._auth = wire.auth_metadata(token)
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=options)
        self._adapters = apb_grpc.AdapterServiceStub(self.channel)
        self._generation = gpb_grpc.GenerationServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> LoramuxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- generation -----------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Iterator[str]:
        """Stream the completion's text. Same options as ``generate_events``."""
        for event in self.generate_events(prompt, timeout=timeout, **options):
            if isinstance(event, TextChunk) and event.text:
                yield event.text

    def generate_events(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Iterator[GenerateEvent]:
        """Stream TextChunk events, then one Completion. Breaking out of the loop cancels the generation.
        Options (messages.GenerateOptions): adapter or adapter_mix ({name: weight}), max_new_tokens,
        min_new_tokens, stop, stop_token_ids, ignore_eos, temperature, top_p, top_k, min_p, typical_p, seed,
        repetition_penalty, presence_penalty, frequency_penalty, logprobs, top_logprobs, prompt_logprobs,
        apply_chat_template, messages (instead of a prompt), request_id."""
        request = wire.generate_request(prompt, options)
        metadata = (*wire.call_metadata(self._auth, request.request_id), *wire.routing_metadata(request))
        call = self._generation.Generate(request, timeout=self._timeout(timeout), metadata=metadata)
        try:
            for response in call:
                if response.HasField("finished"):
                    initial = call.initial_metadata()
                    event = wire.generate_event(response, wire.echoed_request_id(initial), wire.echoed_replica(initial))
                else:
                    event = wire.generate_event(response, "")
                yield event
        except grpc.RpcError as exc:
            raise LoramuxRpcError.from_rpc_error(exc) from None
        finally:
            call.cancel()  # no-op once the stream ended; stops the server's work if the caller broke off

    def tokenize(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        apply_chat_template: bool = False,
        timeout: float | None = None,
    ) -> list[int]:
        """The token ids a Generate with this prompt (or conversation) would see (their count: ``len``)."""
        request = wire.tokenize_request(prompt, messages=messages, apply_chat_template=apply_chat_template)
        return list((self._call(self._generation.Tokenize, request, timeout)).token_ids)

    # -- adapters -------------------------------------------------------------------------------------

    def load_adapter(
        self, name: str, source: str, *, timeout: float | None = None, **options: Unpack[LoadOptions]
    ) -> apb.LoadAdapterResponse:
        """Options (messages.LoadOptions): revision, subfolder, replace, pinned, autocast_adapter_dtype."""
        return self._call(self._adapters.LoadAdapter, wire.load_request(name, source, options), timeout)

    def unload_adapter(
        self, name: str, *, allow_missing: bool = False, timeout: float | None = None
    ) -> apb.Adapter | None:
        request = apb.UnloadAdapterRequest(name=name, allow_missing=allow_missing)
        response = self._call(self._adapters.UnloadAdapter, request, timeout)
        return response.adapter if response.HasField("adapter") else None

    def set_adapter(self, name: str, *, timeout: float | None = None) -> apb.SetAdapterResponse:
        """Make ``name`` the default adapter ("" for the bare base model)."""
        return self._call(self._adapters.SetAdapter, apb.SetAdapterRequest(name=name), timeout)

    def get_adapter(self, name: str, *, timeout: float | None = None) -> apb.Adapter:
        return self._call(self._adapters.GetAdapter, apb.GetAdapterRequest(name=name), timeout).adapter

    def list_adapters_page(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> apb.ListAdaptersResponse:
        request = apb.ListAdaptersRequest(page_size=page_size, page_token=page_token)
        return self._call(self._adapters.ListAdapters, request, timeout)

    def list_adapters(self, *, page_size: int = 0, timeout: float | None = None) -> list[apb.Adapter]:
        """Every loaded adapter, by name, following the pages."""
        adapters: list[apb.Adapter] = []
        token = ""
        while True:
            page = self.list_adapters_page(page_size=page_size, page_token=token, timeout=timeout)
            adapters.extend(page.adapters)
            token = page.next_page_token
            if not token:
                return adapters

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The serving status of ``service`` ("" = the server): "SERVING", "NOT_SERVING", ..."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = self._call(self._health.Check, request, timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    # -- plumbing -------------------------------------------------------------------------------------

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self._timeout(timeout), metadata=wire.call_metadata(self._auth))
        except grpc.RpcError as exc:
            raise LoramuxRpcError.from_rpc_error(exc) from None
