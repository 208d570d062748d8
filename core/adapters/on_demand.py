"""Load on demand: where a name that a request gives, and nobody registered, is looked for.

First the folder ``ROOT/NAME`` under each adapter root, in order, then (unless the Hub is refused) the Hub repo
of that id. A name is a relative path by construction (names.py); its folder's real path (symlinks and '..'
resolved) must lie inside its root, checked before anything is read. A name found nowhere is NOT_FOUND,
naming every place looked at.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loramux.core.adapters.sources import AdapterLocation, AdapterSource, HubSource, restricted_sources
from loramux.core.errors import AdapterNotFoundError, AdapterSourceForbiddenError


@dataclass(frozen=True)
class Located:
    location: AdapterLocation
    searched: tuple[str, ...]  # every place looked at, this one last


class OnDemand:
    def __init__(
        self,
        *,
        roots: Sequence[Path] = (),
        allow_hub: bool = True,
        token: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        self.roots = tuple(Path(os.path.realpath(r)) for r in roots)
        self.allow_hub = allow_hub
        self._token, self._cache_dir = token, cache_dir
        # the folders inside the roots, and the Hub only if allowed: what these loads may read
        self.sources: tuple[AdapterSource, ...] = restricted_sources(local_roots=list(self.roots), allow_hub=allow_hub)

    def locate(self, name: str) -> Located:
        """Where ``name`` is (a folder inside a root, or a Hub repo id that may exist), or AdapterNotFoundError."""
        searched: list[str] = []
        for root in self.roots:
            folder = root / name
            if not Path(os.path.realpath(folder)).is_relative_to(root):
                raise AdapterSourceForbiddenError(
                    f"adapter {name!r} resolves outside the adapter root {str(root)!r}", field="adapter"
                )
            searched.append(str(folder))
            if folder.is_dir():
                return Located(AdapterLocation(str(folder), cache_dir=self._cache_dir), tuple(searched))
        hub = AdapterLocation(name, cache_dir=self._cache_dir, token=self._token)
        if self.allow_hub and HubSource().claims(hub):
            return Located(hub, (*searched, f"hub:{name}"))
        raise self.not_found(name, searched)

    @staticmethod
    def not_found(name: str, searched: Sequence[str]) -> AdapterNotFoundError:
        places = ", ".join(searched) or "nowhere: no adapter root and no Hub"
        return AdapterNotFoundError(
            f"adapter {name!r} is not registered and was not found on demand (looked in: {places})",
            field="adapter",
            metadata={"searched": ", ".join(searched)},
        )
