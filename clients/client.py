"""A small typed Python client for loramux, over the generated stubs (no dependency on the server's code).

    with LoramuxClient("127.0.0.1:50051") as client:
        for text in client.generate("Prove that", adapter="math", max_new_tokens=64):
            print(text, end="", flush=True)
        client.load_adapter("poet", "/srv/adapters/poet")
        print([a.name for a in client.list_adapters()])

``adapter``: None (the default) uses the server's default adapter, "" the bare base model, a name that adapter.
Failures raise ``LoramuxRpcError`` carrying the status code and the decoded google.rpc details.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from loramux.v1 import adapter_service_pb2 as apb
from loramux.v1 import adapter_service_pb2_grpc as apb_grpc
from loramux.v1 import generation_service_pb2 as gpb
from loramux.v1 import generation_service_pb2_grpc as gpb_grpc

MiB = 1 << 20
DEFAULT_TARGET = "127.0.0.1:50051"


@dataclass(frozen=True)
class TextChunk:
    """Newly generated text and token ids (a delta)."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Completion:
    """The end of a successful generation."""

    finish_reason: str  # "eos", "stop_sequence" or "length"
    prompt_tokens: int
    completion_tokens: int
    adapter: str  # the adapter used; "" for the bare base model
    adapter_version: int
    stop_sequence: str
    seed: int | None
    request_id: str  # as echoed by the server in x-request-id


GenerateEvent = TextChunk | Completion


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
        call: Any = error
        err = cls(code=call.code(), message=call.details() or "")
        try:
            status = rpc_status.from_call(call)
        except ValueError:
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


_FINISH = {
    gpb.FINISH_REASON_EOS: "eos",
    gpb.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
    gpb.FINISH_REASON_LENGTH: "length",
}


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
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self.target = target
        self.timeout = timeout
        self._auth: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
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

    def generate(self, prompt: str | Sequence[int], **options: Any) -> Iterator[str]:
        """Stream the completion's text. Same options as ``generate_events``."""
        for event in self.generate_events(prompt, **options):
            if isinstance(event, TextChunk) and event.text:
                yield event.text

    def generate_events(
        self,
        prompt: str | Sequence[int],
        *,
        adapter: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        repetition_penalty: float | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        apply_chat_template: bool = False,
        request_id: str = "",
        timeout: float | None = None,
    ) -> Iterator[GenerateEvent]:
        """Stream TextChunk events, then one Completion. Breaking out of the loop cancels the generation."""
        sampling = gpb.SamplingParams(
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, repetition_penalty=repetition_penalty
        )
        request = gpb.GenerateRequest(
            adapter=adapter,
            sampling=sampling,
            stopping=gpb.StoppingCriteria(max_new_tokens=max_new_tokens, stop=stop, ignore_eos=ignore_eos),
            request_id=request_id,
            apply_chat_template=apply_chat_template,
        )
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(prompt)
        metadata = self._auth if request_id else (*self._auth, ("x-request-id", str(uuid.uuid4())))
        call = self._generation.Generate(request, timeout=self._timeout(timeout), metadata=metadata)
        try:
            for response in call:
                if response.HasField("chunk"):
                    yield TextChunk(response.chunk.text, tuple(response.chunk.token_ids))
                else:
                    yield _completion(response.finished, _request_id(call))
        except grpc.RpcError as exc:
            raise LoramuxRpcError.from_rpc_error(exc) from None
        finally:
            call.cancel()  # no-op once the stream ended; stops the server's work if the caller broke off

    # -- adapters -------------------------------------------------------------------------------------

    def load_adapter(
        self,
        name: str,
        source: str,
        *,
        revision: str = "",
        subfolder: str = "",
        replace: bool = False,
        pinned: bool = False,
        autocast_adapter_dtype: bool | None = None,
        timeout: float | None = None,
    ) -> apb.LoadAdapterResponse:
        request = apb.LoadAdapterRequest(
            name=name,
            source=source,
            revision=revision,
            subfolder=subfolder,
            replace=replace,
            pinned=pinned,
            autocast_adapter_dtype=autocast_adapter_dtype,
        )
        return self._call(self._adapters.LoadAdapter, request, timeout)

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
            metadata = (*self._auth, ("x-request-id", str(uuid.uuid4())))
            return method(request, timeout=self._timeout(timeout), metadata=metadata)
        except grpc.RpcError as exc:
            raise LoramuxRpcError.from_rpc_error(exc) from None


def _request_id(call: Any) -> str:
    return next((v for k, v in call.initial_metadata() or () if k == "x-request-id"), "")


def _completion(finished: gpb.GenerationFinished, request_id: str) -> Completion:
    return Completion(
        finish_reason=_FINISH.get(finished.finish_reason, "unspecified"),
        prompt_tokens=finished.usage.prompt_tokens,
        completion_tokens=finished.usage.completion_tokens,
        adapter=finished.adapter,
        adapter_version=finished.adapter_version,
        stop_sequence=finished.stop_sequence,
        seed=finished.seed if finished.HasField("seed") else None,
        request_id=request_id,
    )
