"""Request messages from keyword options, and caller-side values from response messages (pure functions).

Shared by the sync and the asyncio client, so both send exactly the same requests and return the same types.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

from loramux.client.events import Completion, GenerateEvent, MixMember, TextChunk, TokenLogprob
from loramux.v1 import adapter_service_pb2 as apb
from loramux.v1 import generation_service_pb2 as gpb

MiB = 1 << 20
DEFAULT_TARGET = "127.0.0.1:50051"
REQUEST_ID_KEY = "x-request-id"
# The routing key an adapter-hashing load balancer reads (the server checks it agrees with the body), and the
# replica that served a call, from the response's initial metadata.
ADAPTER_KEY = "x-loramux-adapter"
REPLICA_KEY = "x-loramux-replica"

Metadata = tuple[tuple[str, str], ...]
# A conversation: (role, content) pairs or {"role": ..., "content": ...} mappings, in order.
Messages = Sequence[tuple[str, str] | Mapping[str, str]]


class GenerateOptions(TypedDict, total=False):
    """The keyword options of ``generate`` / ``generate_events`` (unset: the server's default)."""

    adapter: str | None  # None: the server's default adapter; "": the bare base model; a name: that adapter
    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    repetition_penalty: float | None
    stop: Sequence[str]
    ignore_eos: bool
    apply_chat_template: bool
    request_id: str
    messages: Messages  # instead of a prompt: a conversation, rendered with the model's chat template
    adapter_mix: Mapping[str, float] | Sequence[tuple[str, float]]  # instead of adapter: {name: weight}
    logprobs: bool  # each token's log-probability (TextChunk.logprobs)
    top_logprobs: int  # with logprobs or prompt_logprobs: this many alternatives (0-20)
    prompt_logprobs: bool  # the prompt tokens' (Completion.prompt_logprobs)
    min_new_tokens: int
    stop_token_ids: Sequence[int]
    presence_penalty: float | None
    frequency_penalty: float | None
    min_p: float | None
    typical_p: float | None


class LoadOptions(TypedDict, total=False):
    """The keyword options of ``load_adapter``."""

    revision: str
    subfolder: str
    replace: bool
    pinned: bool
    autocast_adapter_dtype: bool | None


_FINISH = {
    gpb.FINISH_REASON_EOS: "eos",
    gpb.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
    gpb.FINISH_REASON_LENGTH: "length",
    gpb.FINISH_REASON_STOP_TOKEN: "stop_token",
}


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)]


def auth_metadata(token: str | None) -> Metadata:
    """``authorization: Bearer <token>`` (plain metadata: grpc refuses call credentials on an insecure channel)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def call_metadata(auth: Metadata, request_id: str = "") -> Metadata:
    """The metadata of one call: authorization, and a fresh x-request-id unless the request carries its own."""
    return auth if request_id else (*auth, (REQUEST_ID_KEY, str(uuid.uuid4())))


def routing_metadata(request: gpb.GenerateRequest) -> Metadata:
    """x-loramux-adapter for a Generate: the adapter it names, or its mix's first member. None for the bare base
    model and for the server's default (the caller does not know which replica's default): a balancer sends
    calls without it to its base-model backend."""
    name = request.adapter_mix[0].name if request.adapter_mix else request.adapter
    return ((ADAPTER_KEY, name),) if name else ()


def generate_request(prompt: str | Sequence[int] | None, options: GenerateOptions) -> gpb.GenerateRequest:
    sampling = gpb.SamplingParams(
        temperature=options.get("temperature"),
        top_p=options.get("top_p"),
        top_k=options.get("top_k"),
        seed=options.get("seed"),
        repetition_penalty=options.get("repetition_penalty"),
        presence_penalty=options.get("presence_penalty"),
        frequency_penalty=options.get("frequency_penalty"),
        min_p=options.get("min_p"),
        typical_p=options.get("typical_p"),
    )
    stopping = gpb.StoppingCriteria(
        max_new_tokens=options.get("max_new_tokens"),
        stop=options.get("stop", ()),
        ignore_eos=options.get("ignore_eos", False),
        min_new_tokens=options.get("min_new_tokens", 0),
        stop_token_ids=options.get("stop_token_ids", ()),
    )
    mix = options.get("adapter_mix", ())
    pairs = mix.items() if isinstance(mix, Mapping) else mix
    request = gpb.GenerateRequest(
        adapter=options.get("adapter"),
        sampling=sampling,
        stopping=stopping,
        request_id=options.get("request_id", ""),
        apply_chat_template=options.get("apply_chat_template", False),
        adapter_mix=[gpb.AdapterWeight(name=n, weight=w) for n, w in pairs],
        logprobs=options.get("logprobs", False),
        top_logprobs=options.get("top_logprobs", 0),
        prompt_logprobs=options.get("prompt_logprobs", False),
    )
    _set_prompt(request, prompt, options.get("messages"))
    return request


def tokenize_request(
    prompt: str | None, *, messages: Messages | None, apply_chat_template: bool
) -> gpb.TokenizeRequest:
    request = gpb.TokenizeRequest(apply_chat_template=apply_chat_template)
    _set_prompt(request, prompt, messages)
    return request


def _set_prompt(request: Any, prompt: str | Sequence[int] | None, messages: Messages | None) -> None:
    if messages is not None:
        if prompt is not None:
            raise ValueError("give a prompt or messages, not both")
        chat = [m if isinstance(m, tuple) else (m["role"], m["content"]) for m in messages]
        request.messages.messages.extend(gpb.ChatMessage(role=r, content=c) for r, c in chat)
    elif isinstance(prompt, str):
        request.text = prompt
    elif prompt is not None:
        request.token_ids.ids.extend(prompt)


def _logprobs(entries: Any) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(e.token_id, e.logprob, tuple((t.token_id, t.logprob) for t in e.top)) for e in entries)


def generate_event(response: gpb.GenerateResponse, request_id: str, replica: str = "") -> GenerateEvent:
    if response.HasField("chunk"):
        chunk = response.chunk
        return TextChunk(chunk.text, tuple(chunk.token_ids), _logprobs(chunk.logprobs))
    finished = response.finished
    return Completion(
        finish_reason=_FINISH.get(finished.finish_reason, "unspecified"),
        prompt_tokens=finished.usage.prompt_tokens,
        completion_tokens=finished.usage.completion_tokens,
        adapter=finished.adapter,
        adapter_version=finished.adapter_version,
        stop_sequence=finished.stop_sequence,
        seed=finished.seed if finished.HasField("seed") else None,
        request_id=request_id,
        stop_token_id=finished.stop_token_id if finished.HasField("stop_token_id") else None,
        prompt_logprobs=_logprobs(finished.prompt_logprobs),
        adapter_mix=tuple(MixMember(m.name, m.version, m.weight) for m in finished.adapter_mix),
        cached_prompt_tokens=finished.usage.cached_prompt_tokens,
        replica=replica,
    )


def echoed_request_id(initial_metadata: Any) -> str:
    """The x-request-id the server echoed in a call's initial metadata ("" if none)."""
    return _metadata_value(initial_metadata, REQUEST_ID_KEY)


def echoed_replica(initial_metadata: Any) -> str:
    """The x-loramux-replica of the replica that served a call ("" if none)."""
    return _metadata_value(initial_metadata, REPLICA_KEY)


def _metadata_value(metadata: Any, key: str) -> str:
    return next((v for k, v in metadata or () if k == key), "")


def load_request(name: str, source: str, options: LoadOptions) -> apb.LoadAdapterRequest:
    return apb.LoadAdapterRequest(
        name=name,
        source=source,
        revision=options.get("revision", ""),
        subfolder=options.get("subfolder", ""),
        replace=options.get("replace", False),
        pinned=options.get("pinned", False),
        autocast_adapter_dtype=options.get("autocast_adapter_dtype"),
    )
