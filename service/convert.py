"""Protobuf <-> core conversion, and the request checks the contract makes at the edge (pure functions).

Core validates what it owns (adapter names, sampling values, token limits, vocabulary); this module checks what
only the wire format has (oneof presence, optional-vs-empty, string lengths, stop list bounds, request ids,
subfolder paths) and raises core's InvalidArgumentError naming the proto field, so errors.py maps everything the
same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath

from google.protobuf.timestamp_pb2 import Timestamp

from loramux.core import AdapterSelection, Finished, FinishReason, GenerationEvent, GenerationRequest
from loramux.core.adapters.adapter import AdapterInfo, AdapterState, LoadResult
from loramux.core.adapters.names import validate_adapter_name
from loramux.core.adapters.sources import SourceKind
from loramux.core.engine.requests import ChatMessage, ChatPrompt, Prompt, SamplingParams, TokenLogprob
from loramux.core.errors import InvalidArgumentError
from loramux.service import pagination
from loramux.service.calls import valid_request_id
from loramux.service.runtime import AdapterLoad
from loramux.v1 import adapter_service_pb2 as apb
from loramux.v1 import generation_service_pb2 as gpb

MAX_STOP_SEQUENCES = 16
MAX_STOP_BYTES = 256
MAX_SOURCE_CHARS = 1024
MAX_REVISION_CHARS = 256
MAX_SUBFOLDER_CHARS = 1024

_FINISH_REASONS = {
    FinishReason.EOS: gpb.FINISH_REASON_EOS,
    FinishReason.STOP_SEQUENCE: gpb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.LENGTH: gpb.FINISH_REASON_LENGTH,
    FinishReason.STOP_TOKEN: gpb.FINISH_REASON_STOP_TOKEN,
}
_SOURCE_KINDS = {SourceKind.LOCAL: apb.ADAPTER_SOURCE_KIND_LOCAL, SourceKind.HUB: apb.ADAPTER_SOURCE_KIND_HUB}
_STATES = {
    AdapterState.RESIDENT: apb.ADAPTER_STATE_RESIDENT,
    AdapterState.LOADING: apb.ADAPTER_STATE_LOADING,
    AdapterState.NOT_RESIDENT: apb.ADAPTER_STATE_NOT_RESIDENT,
}


def _invalid(field: str, message: str) -> InvalidArgumentError:
    return InvalidArgumentError(message, field=field)


# -- GenerationService ----------------------------------------------------------------------------------


def generation_request(pb: gpb.GenerateRequest, *, request_id: str) -> GenerationRequest:
    if pb.request_id and not valid_request_id(pb.request_id):
        raise _invalid("request_id", "request_id must be at most 128 characters of letters, digits, '_', '.', ':', '-'")
    stopping = pb.stopping
    if pb.adapter_mix and pb.HasField("adapter"):
        raise _invalid("adapter_mix", "adapter_mix replaces adapter: set one of them")
    return GenerationRequest(
        prompt=_prompt(pb),
        adapter=_adapter_choice(pb),
        sampling=_sampling(pb.sampling),
        max_new_tokens=stopping.max_new_tokens if stopping.HasField("max_new_tokens") else None,
        stop=_stop_sequences(stopping.stop),
        ignore_eos=stopping.ignore_eos,
        apply_chat_template=pb.apply_chat_template,
        request_id=request_id,
        adapter_mix=tuple((validate_adapter_name(m.name, field="adapter_mix"), m.weight) for m in pb.adapter_mix),
        logprobs=pb.logprobs,
        top_logprobs=pb.top_logprobs,
        prompt_logprobs=pb.prompt_logprobs,
        min_new_tokens=stopping.min_new_tokens,
        stop_token_ids=tuple(stopping.stop_token_ids),
    )


def tokenize_request(pb: gpb.TokenizeRequest) -> GenerationRequest:
    """What Tokenize renders: Generate's prompt handling, nothing else."""
    return GenerationRequest(prompt=_prompt(pb), apply_chat_template=pb.apply_chat_template)


def _prompt(pb: gpb.GenerateRequest | gpb.TokenizeRequest) -> Prompt:
    kind = pb.WhichOneof("input")
    if kind == "token_ids" and isinstance(pb, gpb.GenerateRequest):
        if not pb.token_ids.ids:
            raise _invalid("input", "token_ids holds no token ids")
        if pb.apply_chat_template:
            raise _invalid("apply_chat_template", "apply_chat_template needs a text prompt, not token_ids")
        return tuple(pb.token_ids.ids)
    if kind == "messages":
        return ChatPrompt(tuple(ChatMessage(m.role, m.content) for m in pb.messages.messages))
    if kind != "text":
        raise _invalid("input", "the prompt is missing: set `text`, `token_ids` or `messages`")
    return pb.text  # an empty text is refused by the engine once tokenized (field `input`)


def _adapter_choice(pb: gpb.GenerateRequest) -> str | AdapterSelection:
    if not pb.HasField("adapter"):
        return AdapterSelection.DEFAULT
    if pb.adapter == "":
        return AdapterSelection.BASE
    return validate_adapter_name(pb.adapter, field="adapter")


def _sampling(pb: gpb.SamplingParams) -> SamplingParams:
    def opt(name: str) -> float | int | None:
        return getattr(pb, name) if pb.HasField(name) else None

    return SamplingParams(
        temperature=opt("temperature"),
        top_k=opt("top_k"),  # type: ignore[arg-type]
        top_p=opt("top_p"),
        repetition_penalty=opt("repetition_penalty"),
        seed=opt("seed"),  # type: ignore[arg-type]
        presence_penalty=opt("presence_penalty"),
        frequency_penalty=opt("frequency_penalty"),
        min_p=opt("min_p"),
        typical_p=opt("typical_p"),
    )


def _stop_sequences(stop: Sequence[str]) -> tuple[str, ...]:
    if len(stop) > MAX_STOP_SEQUENCES:
        raise _invalid("stopping.stop", f"at most {MAX_STOP_SEQUENCES} stop sequences (got {len(stop)})")
    for i, s in enumerate(stop):
        if not 1 <= len(s.encode()) <= MAX_STOP_BYTES:
            raise _invalid("stopping.stop", f"stop sequence {i} must be 1-{MAX_STOP_BYTES} bytes of UTF-8")
    return tuple(stop)


def generate_response(event: GenerationEvent) -> gpb.GenerateResponse:
    if not isinstance(event, Finished):
        chunk = gpb.TokenChunk(text=event.text, token_ids=event.token_ids, logprobs=_logprobs(event.logprobs))
        return gpb.GenerateResponse(chunk=chunk)
    finished = gpb.GenerationFinished(
        finish_reason=_FINISH_REASONS[event.reason],
        usage=gpb.Usage(
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            cached_prompt_tokens=event.cached_prompt_tokens,
        ),
        adapter=event.adapter or "",
        adapter_version=event.adapter_version,
        stop_sequence=event.stop_sequence or "",
        seed=event.seed,
        stop_token_id=event.stop_token_id,
        prompt_logprobs=_logprobs(event.prompt_logprobs),
        adapter_mix=[gpb.MixMember(name=m.name, version=m.version, weight=m.weight) for m in event.adapter_mix],
    )
    return gpb.GenerateResponse(finished=finished)


def _logprobs(entries: Sequence[TokenLogprob]) -> list[gpb.TokenLogprob]:
    return [
        gpb.TokenLogprob(
            token_id=e.token_id,
            logprob=e.logprob,
            top=[gpb.TopLogprob(token_id=t.token_id, logprob=t.logprob) for t in e.top],
        )
        for e in entries
    ]


def tokenize_response(ids: Sequence[int]) -> gpb.TokenizeResponse:
    return gpb.TokenizeResponse(token_ids=ids, count=len(ids))


# -- AdapterService -------------------------------------------------------------------------------------


def adapter_name(name: str) -> str:
    """A request's required ``name`` field."""
    if name == "":
        raise _invalid("name", "name is required")
    return validate_adapter_name(name, field="name")


def default_adapter_name(name: str) -> str | None:
    """SetAdapterRequest.name: "" selects the bare base model (None)."""
    return adapter_name(name) if name else None


def load_request(pb: apb.LoadAdapterRequest) -> AdapterLoad:
    adapter_name(pb.name)
    if not pb.source.strip():
        raise _invalid("source", "source is required: a folder on the server or a Hub repo id")
    _check_length("source", pb.source, MAX_SOURCE_CHARS)
    _check_length("revision", pb.revision, MAX_REVISION_CHARS)
    _check_subfolder(pb.subfolder)
    return AdapterLoad(
        name=pb.name,
        source=pb.source,
        revision=pb.revision or None,
        subfolder=pb.subfolder or None,
        replace=pb.replace,
        pinned=pb.pinned,
        autocast_adapter_dtype=pb.autocast_adapter_dtype if pb.HasField("autocast_adapter_dtype") else True,
    )


def _check_length(field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise _invalid(field, f"{field} must be at most {limit} characters (got {len(value)})")


def _check_subfolder(subfolder: str) -> None:
    _check_length("subfolder", subfolder, MAX_SUBFOLDER_CHARS)
    path = PurePosixPath(subfolder)
    if subfolder.startswith("/") or "\\" in subfolder or ".." in path.parts:
        raise _invalid("subfolder", "subfolder must be a relative path with '/' separators and no '..'")


def adapter(info: AdapterInfo) -> apb.Adapter:
    pb = apb.Adapter(
        name=info.name,
        source=info.source,
        source_kind=_SOURCE_KINDS.get(info.source_kind, apb.ADAPTER_SOURCE_KIND_UNSPECIFIED),
        subfolder=info.subfolder or "",
        revision=info.revision or "",
        resolved_revision=info.resolved_revision or "",
        rank=info.max_rank,
        alpha=info.lora_alpha,
        target_modules=info.target_modules,
        num_modules=info.num_modules,
        dtype=info.dtype,
        size_bytes=info.size_bytes,
        is_default=info.is_default,
        pinned=info.pinned,
        version=info.version,
        loaded_at=_timestamp(info.loaded_at),
        state=_STATES[info.state],
        requests_served=info.requests_served,
        on_demand=info.on_demand,
    )
    if info.last_used is not None:
        pb.last_used.CopyFrom(_timestamp(info.last_used))
    return pb


def _timestamp(unix_seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(unix_seconds * 1e9))
    return ts


def load_response(result: LoadResult) -> apb.LoadAdapterResponse:
    return apb.LoadAdapterResponse(
        adapter=adapter(result.info),
        already_loaded=result.already_loaded,
        missing_keys=result.missing_keys,
        unexpected_keys=result.unexpected_keys,
    )


def unload_response(info: AdapterInfo | None) -> apb.UnloadAdapterResponse:
    return apb.UnloadAdapterResponse(adapter=adapter(info) if info is not None else None)


def set_response(info: AdapterInfo | None, previous: str | None) -> apb.SetAdapterResponse:
    return apb.SetAdapterResponse(
        adapter=adapter(info) if info is not None else None, previous_default_adapter=previous or ""
    )


def list_response(
    pb: apb.ListAdaptersRequest, infos: Sequence[AdapterInfo], default: str | None
) -> apb.ListAdaptersResponse:
    size = pagination.page_size(pb.page_size)
    page, next_token = pagination.paginate(infos, [i.name for i in infos], size=size, token=pb.page_token)
    return apb.ListAdaptersResponse(
        adapters=[adapter(i) for i in page], next_page_token=next_token, default_adapter=default or ""
    )
