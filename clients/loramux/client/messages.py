"""Request messages from keyword options, and caller-side values from response messages (pure functions).

Shared by the sync and the asyncio client, so both send exactly the same requests and return the same types.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, TypedDict

from loramux.client.events import Completion, GenerateEvent, TextChunk
from loramux.v1 import adapter_service_pb2 as apb
from loramux.v1 import generation_service_pb2 as gpb

MiB = 1 << 20
DEFAULT_TARGET = "127.0.0.1:50051"
REQUEST_ID_KEY = "x-request-id"

Metadata = tuple[tuple[str, str], ...]


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
}


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)]


def auth_metadata(token: str | None) -> Metadata:
    """``authorization: Bearer <token>`` (plain metadata: grpc refuses call credentials on an insecure channel)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def call_metadata(auth: Metadata, request_id: str = "") -> Metadata:
    """The metadata of one call: authorization, and a fresh x-request-id unless the request carries its own."""
    return auth if request_id else (*auth, (REQUEST_ID_KEY, str(uuid.uuid4())))


def generate_request(prompt: str | Sequence[int], options: GenerateOptions) -> gpb.GenerateRequest:
    sampling = gpb.SamplingParams(
        temperature=options.get("temperature"),
        top_p=options.get("top_p"),
        top_k=options.get("top_k"),
        seed=options.get("seed"),
        repetition_penalty=options.get("repetition_penalty"),
    )
    stopping = gpb.StoppingCriteria(
        max_new_tokens=options.get("max_new_tokens"),
        stop=options.get("stop", ()),
        ignore_eos=options.get("ignore_eos", False),
    )
    request = gpb.GenerateRequest(
        adapter=options.get("adapter"),
        sampling=sampling,
        stopping=stopping,
        request_id=options.get("request_id", ""),
        apply_chat_template=options.get("apply_chat_template", False),
    )
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


def generate_event(response: gpb.GenerateResponse, request_id: str) -> GenerateEvent:
    if response.HasField("chunk"):
        return TextChunk(response.chunk.text, tuple(response.chunk.token_ids))
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
    )


def echoed_request_id(initial_metadata: Any) -> str:
    """The x-request-id the server echoed in a call's initial metadata ("" if none)."""
    return next((v for k, v in initial_metadata or () if k == REQUEST_ID_KEY), "")


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
