"""Restricted adapter sources: local folders only inside allowed roots, the Hub turned off; nothing half-loaded."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest

from loramux.core import AdapterManager
from loramux.core.adapters.sources import (
    AdapterLocation,
    HubSource,
    LocalDirSource,
    RefusedSource,
    SourceKind,
    fetch_adapter_files,
    restricted_sources,
)
from loramux.core.errors import AdapterSourceForbiddenError


@pytest.fixture
def layout(tmp_path: Path, adapter_dirs: dict[str, Path]) -> dict[str, Path]:
    """root/inside (an adapter), outside (another), root/escape -> outside (a symlink), root/sneaky (weights
    symlinked to outside's)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    shutil.copytree(adapter_dirs["math"], root / "inside")
    shutil.copytree(adapter_dirs["poet"], outside)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "sneaky").mkdir()
    shutil.copy(outside / "adapter_config.json", root / "sneaky" / "adapter_config.json")
    (root / "sneaky" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    return {"root": root, "inside": root / "inside", "outside": outside}


def fetch(source: LocalDirSource, model_id: str | Path, subfolder: str | None = None):
    return fetch_adapter_files(AdapterLocation(str(model_id), subfolder=subfolder), [source])


def test_folders_inside_a_root_load(layout) -> None:
    source = LocalDirSource(roots=[layout["root"]])
    assert fetch(source, layout["inside"]).config.parent == layout["inside"]
    assert fetch(source, layout["root"], subfolder="inside").source is SourceKind.LOCAL


@pytest.mark.parametrize(
    "where",
    ["outside", "root/escape", "root/../outside", "root/sneaky", "missing-outside", "root/../missing"],
)
def test_anything_resolving_outside_the_roots_is_forbidden(layout, where: str) -> None:
    tmp = layout["root"].parent
    source = LocalDirSource(roots=[layout["root"]])
    with pytest.raises(AdapterSourceForbiddenError, match="outside this server's allowed adapter roots") as caught:
        fetch(source, f"{tmp}/{where}")
    assert caught.value.reason == "ADAPTER_SOURCE_FORBIDDEN" and caught.value.field == "source"


def test_a_subfolder_cannot_climb_out(layout) -> None:
    with pytest.raises(AdapterSourceForbiddenError):
        fetch(LocalDirSource(roots=[layout["root"]]), layout["inside"], subfolder="../../outside")


def test_without_roots_any_folder_loads(layout) -> None:
    assert fetch(LocalDirSource(), layout["outside"]).source is SourceKind.LOCAL


def test_the_hub_can_be_refused() -> None:
    refused = RefusedSource(HubSource(), why="the Hub is off here")
    location = AdapterLocation("someone/some-adapter")
    assert refused.claims(location) and refused.kind is SourceKind.HUB
    with pytest.raises(AdapterSourceForbiddenError, match="'someone/some-adapter': the Hub is off here"):
        fetch_adapter_files(location, [LocalDirSource(), refused])
    with pytest.raises(AdapterSourceForbiddenError, match="turned off"):
        fetch_adapter_files(location, restricted_sources(local_roots=None, allow_hub=False))


def test_a_forbidden_load_changes_nothing(layout, base_model) -> None:
    manager = AdapterManager(copy.deepcopy(base_model))
    manager.load_adapter(str(layout["inside"]), "inside")
    restricted = restricted_sources(local_roots=[layout["root"]], allow_hub=True)
    with pytest.raises(AdapterSourceForbiddenError):
        manager.load_adapter(str(layout["outside"]), "outside", sources=restricted)
    with pytest.raises(AdapterSourceForbiddenError):
        manager.load_adapter(str(layout["outside"]), "inside", replace=True, sources=restricted)
    assert [(a.name, a.version) for a in manager.list_adapters()] == [("inside", 1)]
    assert manager.load_adapter(str(layout["outside"]), "outside").info.name == "outside"  # own sources: any
