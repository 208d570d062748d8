"""How an adapter arrives: sources behind one small interface, tried in order (first that claims wins).

A source turns what the caller named (``AdapterLocation``) into two local files (``AdapterFiles``). Adding a
source (S3, an HTTP registry, ...) means adding a class, not a branch. Restrictions are sources too: a
``LocalDirSource`` with ``roots`` refuses folders (and files) outside them, and a ``RefusedSource`` claims
what another source would and refuses it (e.g. the Hub, on a server that must not download).
"""

from __future__ import annotations

import enum
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loramux.core.errors import (
    AdapterSourceForbiddenError,
    AdapterSourceNotFoundError,
    AdapterSourceUnavailableError,
    InvalidArgumentError,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")  # safetensors first, as PEFT does


class SourceKind(enum.Enum):
    """Where an adapter's files came from."""

    LOCAL = "local"  # a folder on this machine
    HUB = "hub"  # a Hugging Face Hub repo, through the Hub cache


@dataclass(frozen=True)
class AdapterLocation:
    """Where the caller says an adapter is: a local folder or a Hub repo id, plus Hub options."""

    model_id: str
    subfolder: str | None = None
    revision: str | None = None
    cache_dir: str | None = None
    token: str | None = field(default=None, repr=False, compare=False)

    def identity(self) -> tuple[str, str | None, str | None]:
        """What makes two loads 'the same adapter' (idempotent reload vs conflict)."""
        return (self.model_id, self.subfolder or None, self.revision or None)


@dataclass(frozen=True)
class AdapterFiles:
    config: Path
    weights: Path
    source: SourceKind  # which kind of source resolved it
    resolved_revision: str | None = None  # Hub commit sha, when known

    @property
    def fingerprint(self) -> tuple:
        """What changes when the files do: the Hub commit, and each file's size and modification time. A reload
        of an evicted adapter compares it with the last load's to tell an unchanged adapter from a new one."""
        stats = [(p.stat().st_size, p.stat().st_mtime_ns) for p in (self.config, self.weights)]
        return (self.resolved_revision, *stats)


class AdapterSource(ABC):
    """Resolves an AdapterLocation to local files, or says it does not handle that kind of location."""

    kind: SourceKind

    @abstractmethod
    def claims(self, location: AdapterLocation) -> bool: ...

    @abstractmethod
    def fetch(self, location: AdapterLocation) -> AdapterFiles: ...


class LocalDirSource(AdapterSource):
    """A folder on this machine (``model_id`` is a path; ``subfolder`` is joined to it).

    With ``roots``, the folder and both files must lie inside one of them once symlinks and ``..`` are
    resolved; anything else is refused before a byte is read.
    """

    kind = SourceKind.LOCAL

    def __init__(self, *, roots: Sequence[Path] | None = None) -> None:
        self.roots = None if roots is None else tuple(Path(os.path.realpath(r)) for r in roots)

    def claims(self, location: AdapterLocation) -> bool:
        mid = location.model_id
        return os.path.isdir(mid) or mid.startswith(("/", ".", "~"))

    def fetch(self, location: AdapterLocation) -> AdapterFiles:
        if location.revision:
            raise InvalidArgumentError(
                f"revision must be empty for a local folder (got {location.revision!r})", field="revision"
            )
        folder = Path(location.model_id).expanduser()
        if location.subfolder:
            folder = folder / location.subfolder
        self._check_inside_roots(folder, shown=folder)
        if not folder.is_dir():
            raise AdapterSourceNotFoundError(f"adapter folder {str(folder)!r} does not exist", field="source")
        config = folder / CONFIG_NAME
        if not config.is_file():
            raise AdapterSourceNotFoundError(f"{CONFIG_NAME} is missing in {str(folder)!r}", field="source")
        for weights_name in WEIGHTS_NAMES:
            if (folder / weights_name).is_file():
                self._check_inside_roots(config, shown=folder)
                self._check_inside_roots(folder / weights_name, shown=folder)
                return AdapterFiles(config=config, weights=folder / weights_name, source=self.kind)
        raise AdapterSourceNotFoundError(f"no {' or '.join(WEIGHTS_NAMES)} in {str(folder)!r}", field="source")

    def _check_inside_roots(self, path: Path, *, shown: Path) -> None:
        if self.roots is None:
            return
        real = Path(os.path.realpath(path))
        if not any(real.is_relative_to(root) for root in self.roots):
            raise AdapterSourceForbiddenError(
                f"adapter folder {str(shown)!r} is outside this server's allowed adapter roots", field="source"
            )


class HubSource(AdapterSource):
    """A Hugging Face Hub repo id, through huggingface_hub (honours HF_HUB_OFFLINE and the cache)."""

    kind = SourceKind.HUB

    def claims(self, location: AdapterLocation) -> bool:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(location.model_id)
        except HFValidationError:
            return False
        return True

    def fetch(self, location: AdapterLocation) -> AdapterFiles:
        config = self._download(location, CONFIG_NAME)
        if config is None:
            raise AdapterSourceNotFoundError(
                f"{CONFIG_NAME} not found in Hub repo {location.model_id!r}"
                + (f" (revision {location.revision!r})" if location.revision else ""),
                field="source",
            )
        for weights_name in WEIGHTS_NAMES:
            weights = self._download(location, weights_name)
            if weights is not None:
                return AdapterFiles(config, weights, self.kind, _snapshot_commit(weights))
        raise AdapterSourceNotFoundError(
            f"no {' or '.join(WEIGHTS_NAMES)} in Hub repo {location.model_id!r}", field="source"
        )

    @staticmethod
    def _download(location: AdapterLocation, filename: str) -> Path | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            path = hf_hub_download(
                location.model_id,
                filename,
                subfolder=location.subfolder or None,
                revision=location.revision or None,
                cache_dir=location.cache_dir,
                token=location.token,
            )
        except (EntryNotFoundError, LocalEntryNotFoundError):
            return None
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise AdapterSourceNotFoundError(
                f"Hub repo {location.model_id!r} or revision {location.revision!r} not found: {exc}",
                field="source",
            ) from exc
        except (OSError, ValueError) as exc:  # network errors, HTTP errors, offline without cache
            raise AdapterSourceUnavailableError(
                f"Hub repo {location.model_id!r} could not be reached: {exc}", field="source"
            ) from exc
        return Path(path)


class RefusedSource(AdapterSource):
    """Claims what ``inner`` claims and refuses it, saying why: a source the server's configuration turns off."""

    def __init__(self, inner: AdapterSource, *, why: str) -> None:
        self.inner, self.why, self.kind = inner, why, inner.kind

    def claims(self, location: AdapterLocation) -> bool:
        return self.inner.claims(location)

    def fetch(self, location: AdapterLocation) -> AdapterFiles:
        raise AdapterSourceForbiddenError(f"{location.model_id!r}: {self.why}", field="source")


def restricted_sources(*, local_roots: Sequence[Path] | None, allow_hub: bool) -> tuple[AdapterSource, ...]:
    """The default sources, with local folders limited to ``local_roots`` (None: any) and the Hub on or off."""
    hub: AdapterSource = HubSource()
    if not allow_hub:
        hub = RefusedSource(hub, why="loading adapters from the Hugging Face Hub is turned off on this server")
    return (LocalDirSource(roots=local_roots), hub)


def _snapshot_commit(path: Path) -> str | None:
    parts = path.parts
    if "snapshots" in parts:
        index = parts.index("snapshots")
        if index + 1 < len(parts):
            return parts[index + 1]
    return None


DEFAULT_SOURCES: tuple[AdapterSource, ...] = (LocalDirSource(), HubSource())


def fetch_adapter_files(location: AdapterLocation, sources: Sequence[AdapterSource]) -> AdapterFiles:
    if not location.model_id.strip():
        raise InvalidArgumentError("source must name a local folder or a Hub repo id", field="source")
    for source in sources:
        if source.claims(location):
            return source.fetch(location)
    names = ", ".join(s.kind.value for s in sources)
    raise AdapterSourceNotFoundError(
        f"{location.model_id!r} is neither an existing folder nor a valid Hub repo id (sources: {names})",
        field="source",
    )
