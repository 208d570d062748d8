import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterSourceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_SOURCE_KIND_UNSPECIFIED: _ClassVar[AdapterSourceKind]
    ADAPTER_SOURCE_KIND_LOCAL: _ClassVar[AdapterSourceKind]
    ADAPTER_SOURCE_KIND_HUB: _ClassVar[AdapterSourceKind]

class AdapterState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_STATE_UNSPECIFIED: _ClassVar[AdapterState]
    ADAPTER_STATE_RESIDENT: _ClassVar[AdapterState]
    ADAPTER_STATE_LOADING: _ClassVar[AdapterState]
    ADAPTER_STATE_NOT_RESIDENT: _ClassVar[AdapterState]
ADAPTER_SOURCE_KIND_UNSPECIFIED: AdapterSourceKind
ADAPTER_SOURCE_KIND_LOCAL: AdapterSourceKind
ADAPTER_SOURCE_KIND_HUB: AdapterSourceKind
ADAPTER_STATE_UNSPECIFIED: AdapterState
ADAPTER_STATE_RESIDENT: AdapterState
ADAPTER_STATE_LOADING: AdapterState
ADAPTER_STATE_NOT_RESIDENT: AdapterState

class Adapter(_message.Message):
    __slots__ = ("name", "source", "source_kind", "subfolder", "revision", "resolved_revision", "rank", "alpha", "target_modules", "num_modules", "dtype", "size_bytes", "is_default", "pinned", "version", "loaded_at", "last_used", "state", "requests_served", "on_demand")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_KIND_FIELD_NUMBER: _ClassVar[int]
    SUBFOLDER_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_REVISION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    NUM_MODULES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_SERVED_FIELD_NUMBER: _ClassVar[int]
    ON_DEMAND_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: str
    source_kind: AdapterSourceKind
    subfolder: str
    revision: str
    resolved_revision: str
    rank: int
    alpha: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    num_modules: int
    dtype: str
    size_bytes: int
    is_default: bool
    pinned: bool
    version: int
    loaded_at: _timestamp_pb2.Timestamp
    last_used: _timestamp_pb2.Timestamp
    state: AdapterState
    requests_served: int
    on_demand: bool
    def __init__(self, name: _Optional[str] = ..., source: _Optional[str] = ..., source_kind: _Optional[_Union[AdapterSourceKind, str]] = ..., subfolder: _Optional[str] = ..., revision: _Optional[str] = ..., resolved_revision: _Optional[str] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., num_modules: _Optional[int] = ..., dtype: _Optional[str] = ..., size_bytes: _Optional[int] = ..., is_default: _Optional[bool] = ..., pinned: _Optional[bool] = ..., version: _Optional[int] = ..., loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_used: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[AdapterState, str]] = ..., requests_served: _Optional[int] = ..., on_demand: _Optional[bool] = ...) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("name", "source", "revision", "subfolder", "replace", "pinned", "autocast_adapter_dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SUBFOLDER_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    AUTOCAST_ADAPTER_DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: str
    revision: str
    subfolder: str
    replace: bool
    pinned: bool
    autocast_adapter_dtype: bool
    def __init__(self, name: _Optional[str] = ..., source: _Optional[str] = ..., revision: _Optional[str] = ..., subfolder: _Optional[str] = ..., replace: _Optional[bool] = ..., pinned: _Optional[bool] = ..., autocast_adapter_dtype: _Optional[bool] = ...) -> None: ...

class LoadAdapterResponse(_message.Message):
    __slots__ = ("adapter", "already_loaded", "missing_keys", "unexpected_keys")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    ALREADY_LOADED_FIELD_NUMBER: _ClassVar[int]
    MISSING_KEYS_FIELD_NUMBER: _ClassVar[int]
    UNEXPECTED_KEYS_FIELD_NUMBER: _ClassVar[int]
    adapter: Adapter
    already_loaded: bool
    missing_keys: _containers.RepeatedScalarFieldContainer[str]
    unexpected_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, adapter: _Optional[_Union[Adapter, _Mapping]] = ..., already_loaded: _Optional[bool] = ..., missing_keys: _Optional[_Iterable[str]] = ..., unexpected_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class UnloadAdapterRequest(_message.Message):
    __slots__ = ("name", "allow_missing")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALLOW_MISSING_FIELD_NUMBER: _ClassVar[int]
    name: str
    allow_missing: bool
    def __init__(self, name: _Optional[str] = ..., allow_missing: _Optional[bool] = ...) -> None: ...

class UnloadAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: Adapter
    def __init__(self, adapter: _Optional[_Union[Adapter, _Mapping]] = ...) -> None: ...

class SetAdapterRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class SetAdapterResponse(_message.Message):
    __slots__ = ("adapter", "previous_default_adapter")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_DEFAULT_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: Adapter
    previous_default_adapter: str
    def __init__(self, adapter: _Optional[_Union[Adapter, _Mapping]] = ..., previous_default_adapter: _Optional[str] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: Adapter
    def __init__(self, adapter: _Optional[_Union[Adapter, _Mapping]] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "next_page_token", "default_adapter")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[Adapter]
    next_page_token: str
    default_adapter: str
    def __init__(self, adapters: _Optional[_Iterable[_Union[Adapter, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., default_adapter: _Optional[str] = ...) -> None: ...
