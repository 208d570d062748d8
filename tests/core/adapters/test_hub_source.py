"""Hub repo ids, resolved offline (HF_HUB_OFFLINE=1) from a hand-built huggingface_hub cache:
<cache>/models--<owner>--<name>/{refs/main, blobs/<sha256>, snapshots/<commit>/<files> -> ../../blobs/<sha256>}."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from loramux.core import AdapterManager
from loramux.core.adapters.sources import SourceKind
from loramux.core.errors import AdapterAlreadyExistsError, AdapterSourceNotFoundError, AdapterSourceUnavailableError
from tests.conftest import input_ids, peft_model_for, peft_row_logits, routed_logits

ARCH = "gpt2"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def populate(cache: Path, repo_id: str, commit: str, files: dict[str, Path], *, ref: str | None = "main") -> Path:
    """Put files into the cache as huggingface_hub lays them out; returns the snapshot folder."""
    owner, name = repo_id.split("/")
    repo = cache / f"models--{owner}--{name}"
    snapshot = repo / "snapshots" / commit
    for rel, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        dst = snapshot / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, dst.parent), dst)
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def adapter_files(folder: Path, prefix: str = "") -> dict[str, Path]:
    return {
        f"{prefix}{p.name}": p
        for p in folder.iterdir()
        if p.name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
    }


@pytest.fixture
def hub(tmp_path, make_adapter):
    """A cache holding owner/tiny-lora at COMMIT (main) and OLD_COMMIT, with a subfolder adapter at COMMIT."""
    main = make_adapter(ARCH, "hub_main", seed=11, r=4, target_modules=["c_attn", "mlp.c_proj"])
    old = make_adapter(ARCH, "hub_old", seed=12, r=2, target_modules=["c_fc"])
    sub = make_adapter(ARCH, "hub_sub", seed=13, r=3, target_modules=["wte", "attn.c_proj"])
    cache = tmp_path / "hf-cache"
    populate(cache, "owner/tiny-lora", COMMIT, {**adapter_files(main), **adapter_files(sub, "variants/sub/")})
    populate(cache, "owner/tiny-lora", OLD_COMMIT, adapter_files(old), ref=None)
    return cache, {"main": main, "old": old, "sub": sub}


def test_offline_flag_is_set():
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_loads_from_cache(fresh_model, base_models, hub):
    cache, local = hub
    model = fresh_model(ARCH)
    manager = AdapterManager(model)
    info = manager.load_adapter("owner/tiny-lora", "x", cache_dir=str(cache)).info
    assert info.source == "owner/tiny-lora"
    assert info.source_kind is SourceKind.HUB
    assert info.resolved_revision == COMMIT
    assert info.revision is None
    peft_model = peft_model_for(base_models[ARCH], {"x": local["main"]})
    rows = ["x", None, "x"]
    ids = input_ids(len(rows))
    torch.testing.assert_close(
        routed_logits(model, manager, ids, rows), peft_row_logits(peft_model, ids, rows), atol=1e-5, rtol=1e-5
    )


def test_pinned_revision(fresh_model, base_models, hub):
    cache, local = hub
    model = fresh_model(ARCH)
    manager = AdapterManager(model)
    old = manager.load_adapter("owner/tiny-lora", "old", revision=OLD_COMMIT, cache_dir=str(cache)).info
    assert (old.revision, old.resolved_revision) == (OLD_COMMIT, OLD_COMMIT)
    assert old.max_rank == 2 and old.target_modules == ("c_fc",)
    new = manager.load_adapter("owner/tiny-lora", "new", revision=COMMIT, cache_dir=str(cache)).info
    assert new.resolved_revision == COMMIT and new.max_rank == 4
    peft_model = peft_model_for(base_models[ARCH], {"old": local["old"], "new": local["main"]})
    rows = ["old", "new", None]
    ids = input_ids(len(rows))
    torch.testing.assert_close(
        routed_logits(model, manager, ids, rows), peft_row_logits(peft_model, ids, rows), atol=1e-5, rtol=1e-5
    )


def test_revision_is_part_of_the_identity(fresh_model, hub):
    cache, _ = hub
    manager = AdapterManager(fresh_model(ARCH))
    manager.load_adapter("owner/tiny-lora", "x", revision=OLD_COMMIT, cache_dir=str(cache))
    again = manager.load_adapter("owner/tiny-lora", "x", revision=OLD_COMMIT, cache_dir=str(cache))
    assert again.already_loaded
    with pytest.raises(AdapterAlreadyExistsError):
        manager.load_adapter("owner/tiny-lora", "x", revision=COMMIT, cache_dir=str(cache))
    replaced = manager.load_adapter("owner/tiny-lora", "x", revision=COMMIT, cache_dir=str(cache), replace=True)
    assert replaced.info.version == 2 and replaced.info.resolved_revision == COMMIT


def test_subfolder(fresh_model, base_models, hub):
    cache, local = hub
    model = fresh_model(ARCH)
    manager = AdapterManager(model)
    info = manager.load_adapter("owner/tiny-lora", "sub", subfolder="variants/sub", cache_dir=str(cache)).info
    assert info.subfolder == "variants/sub" and info.source_kind is SourceKind.HUB and info.resolved_revision == COMMIT
    assert info.max_rank == 3
    peft_model = peft_model_for(base_models[ARCH], {"sub": local["sub"]})
    rows = [None, "sub", "sub"]
    ids = input_ids(len(rows))
    torch.testing.assert_close(
        routed_logits(model, manager, ids, rows), peft_row_logits(peft_model, ids, rows), atol=1e-5, rtol=1e-5
    )


def test_bin_fallback_from_cache(fresh_model, base_models, tmp_path, make_adapter):
    folder = make_adapter(ARCH, "hub_bin", seed=14, target_modules=["c_attn"], safe_serialization=False)
    cache = tmp_path / "bin-cache"
    populate(cache, "owner/pickled", COMMIT, adapter_files(folder))
    model = fresh_model(ARCH)
    manager = AdapterManager(model)
    assert manager.load_adapter("owner/pickled", "p", cache_dir=str(cache)).info.resolved_revision == COMMIT
    peft_model = peft_model_for(base_models[ARCH], {"p": folder})
    rows = ["p", None]
    ids = input_ids(len(rows))
    torch.testing.assert_close(
        routed_logits(model, manager, ids, rows), peft_row_logits(peft_model, ids, rows), atol=1e-5, rtol=1e-5
    )


NOT_FOUND = (AdapterSourceNotFoundError, AdapterSourceUnavailableError)


def _assert_failed_cleanly(manager: AdapterManager, **kwargs) -> None:
    before = manager.list_adapters()
    with pytest.raises(NOT_FOUND) as err:
        manager.load_adapter(**kwargs)
    assert err.value.field == "source"
    assert manager.list_adapters() == before


def test_repo_not_in_cache(fresh_model, hub):
    cache, _ = hub
    manager = AdapterManager(fresh_model(ARCH))
    _assert_failed_cleanly(manager, model_id="owner/absent", adapter_name="x", cache_dir=str(cache))


def test_revision_not_in_cache(fresh_model, hub):
    cache, _ = hub
    manager = AdapterManager(fresh_model(ARCH))
    _assert_failed_cleanly(
        manager, model_id="owner/tiny-lora", adapter_name="x", revision="b" * 40, cache_dir=str(cache)
    )
    _assert_failed_cleanly(
        manager, model_id="owner/tiny-lora", adapter_name="x", revision="some-branch", cache_dir=str(cache)
    )


def test_subfolder_not_in_cache(fresh_model, hub):
    cache, _ = hub
    manager = AdapterManager(fresh_model(ARCH))
    _assert_failed_cleanly(
        manager, model_id="owner/tiny-lora", adapter_name="x", subfolder="variants/none", cache_dir=str(cache)
    )


def test_weights_missing_from_cache(fresh_model, tmp_path, make_adapter):
    folder = make_adapter(ARCH, "hub_noweights", seed=15, target_modules=["c_attn"])
    cache = tmp_path / "partial-cache"
    populate(cache, "owner/config-only", COMMIT, {"adapter_config.json": folder / "adapter_config.json"})
    manager = AdapterManager(fresh_model(ARCH))
    _assert_failed_cleanly(manager, model_id="owner/config-only", adapter_name="x", cache_dir=str(cache))


def test_cache_moved_away(fresh_model, hub):
    cache, _ = hub
    manager = AdapterManager(fresh_model(ARCH))
    manager.load_adapter("owner/tiny-lora", "x", cache_dir=str(cache))
    shutil.rmtree(cache)
    _assert_failed_cleanly(manager, model_id="owner/tiny-lora", adapter_name="y", cache_dir=str(cache))
    assert [i.name for i in manager.list_adapters()] == ["x"]
