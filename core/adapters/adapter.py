"""What a loaded adapter is (spec, weights, where it came from) and the plain views the API returns."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from loramux.core.adapters.sources import AdapterFiles, AdapterLocation, SourceKind
from loramux.core.adapters.spec import LoraSpec
from loramux.core.adapters.targeting import Target
from loramux.core.lora.weights import AdapterWeights


@dataclass(frozen=True)
class AdapterInfo:
    """A snapshot of one resident adapter, safe to hand to any thread."""

    name: str
    source: str  # what the caller passed as model_id: a folder or a Hub repo id
    source_kind: SourceKind
    subfolder: str | None
    revision: str | None  # as requested
    resolved_revision: str | None  # Hub commit sha, when known
    max_rank: int  # largest per-module rank
    lora_alpha: float
    target_modules: tuple[str, ...]  # distinct module leaf names, e.g. ("q_proj", "v_proj")
    num_modules: int  # wrapped base modules this adapter changes
    dtype: str
    size_bytes: int
    is_default: bool
    pinned: bool
    trainable: bool
    version: int  # starts at 1, bumps on every replace
    loaded_at: float  # unix seconds
    last_used: float | None


@dataclass(frozen=True)
class LoadResult:
    info: AdapterInfo
    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]
    already_loaded: bool


class AdapterEventKind(enum.Enum):
    LOAD = "load"
    REPLACE = "replace"
    UNLOAD = "unload"
    EVICT = "evict"


@dataclass(frozen=True)
class AdapterEvent:
    """A change of the resident adapters, reported to AdapterManager's observer (metrics, audit logs)."""

    kind: AdapterEventKind
    name: str
    size_bytes: int  # the adapter's weights (for REPLACE: the new ones)
    seconds: float = 0.0  # load/replace: the whole load_adapter call (fetch, validate, build, commit)


@dataclass(eq=False)
class LoadedAdapter:
    """An adapter resident in memory. Routing holds references to it, so an unloaded adapter stays valid for
    the rows that started with it until they let go."""

    name: str
    location: AdapterLocation
    files: AdapterFiles
    spec: LoraSpec
    targets: list[Target]
    weights: AdapterWeights
    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]
    trainable: bool
    pinned: bool
    version: int = 1
    loaded_at: float = field(default_factory=time.time)
    last_used: float | None = None

    def info(self, *, is_default: bool) -> AdapterInfo:
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in self.weights.tensors()})
        return AdapterInfo(
            name=self.name,
            source=self.location.model_id,
            source_kind=self.files.source,
            subfolder=self.location.subfolder,
            revision=self.location.revision,
            resolved_revision=self.files.resolved_revision,
            max_rank=max((t.r for t in self.targets), default=0),
            lora_alpha=self.spec.lora_alpha,
            target_modules=tuple(sorted({t.name.rpartition(".")[2] for t in self.targets})),
            num_modules=len(self.weights.module_names),
            dtype=",".join(dtypes),
            size_bytes=self.weights.nbytes,
            is_default=is_default,
            pinned=self.pinned,
            trainable=self.trainable,
            version=self.version,
            loaded_at=self.loaded_at,
            last_used=self.last_used,
        )

    def parameters(self) -> list:
        """The trainable tensors (for an optimizer) when loaded with is_trainable=True."""
        return [t for t in self.weights.tensors() if t.requires_grad]
