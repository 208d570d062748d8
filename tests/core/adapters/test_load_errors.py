"""Every rejected load raises its specific typed error and leaves no trace: the adapter list, the bare model's
outputs and the other adapters' outputs are unchanged, and a later valid load under the same name works."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from loramux.core import AdapterManager
from loramux.core.errors import (
    AdapterSourceNotFoundError,
    AdapterSourceUnavailableError,
    CorruptAdapterError,
    IncompatibleAdapterError,
    InvalidArgumentError,
    LoramuxError,
    UnsupportedAdapterError,
)
from tests.conftest import bare_logits, build_base, edit_weights, input_ids, rewrite_config, routed_logits

ARCH = "llama"


class World:
    """A model with one adapter ("good") already loaded, and a way to check that nothing moved."""

    def __init__(self, model, manager: AdapterManager, valid: Path):
        self.model, self.manager, self.valid = model, manager, valid
        self.ids = input_ids(3)
        self.rows = ["good", None, "good"]
        self.state = self._state()

    def _state(self):
        return (
            # last_used and requests_served move with every routed forward, including the checks themselves
            [dataclasses.replace(i, last_used=None, requests_served=0) for i in self.manager.list_adapters()],
            self.manager.default_adapter,
            bare_logits(self.model, self.ids),
            routed_logits(self.model, self.manager, self.ids, self.rows),
            sorted(n for n, _ in self.model.named_modules()),
        )

    def reject(self, error: type[LoramuxError], source: str | Path, name: str = "x", **kwargs) -> LoramuxError:
        with pytest.raises(error) as info:
            self.manager.load_adapter(str(source), name, **kwargs)
        err = info.value
        assert err.reason and err.reason == type(err).reason
        assert str(err)
        self.assert_unchanged()
        return err

    def assert_unchanged(self) -> None:
        infos, default, bare, routed, modules = self._state()
        assert infos == self.state[0]
        assert default == self.state[1]
        assert torch.equal(bare, self.state[2])
        assert torch.equal(routed, self.state[3])
        assert modules == self.state[4], "a failed load must not wrap any module"

    def then_valid_load_works(self, name: str = "x") -> None:
        result = self.manager.load_adapter(str(self.valid), name)
        assert result.already_loaded is False
        ids = self.ids
        expected = routed_logits(self.model, self.manager, ids, ["good"] * 3)
        torch.testing.assert_close(routed_logits(self.model, self.manager, ids, [name] * 3), expected)


@pytest.fixture
def world(fresh_model, make_adapter) -> World:
    model = fresh_model(ARCH)
    manager = AdapterManager(model)
    good = make_adapter(ARCH, "good", seed=1, target_modules=["q_proj", "v_proj"])
    manager.load_adapter(str(good), "good")
    manager.set_adapter("good")
    # "x" will be the same adapter as "good" once a valid load succeeds.
    return World(model, manager, good)


@pytest.fixture
def copy_of(tmp_path) -> Callable[[Path, str], Path]:
    def make(folder: Path, name: str) -> Path:
        dst = tmp_path / "edited" / name
        shutil.copytree(folder, dst)
        return dst

    return make


# -- config -----------------------------------------------------------------------------------------------


def test_unsupported_config(world, copy_of):
    bad = copy_of(world.valid, "dora")
    rewrite_config(bad, use_dora=True, bias="all", peft_type="LOHA")
    err = world.reject(UnsupportedAdapterError, bad)
    assert len(err.problems) == 3
    for field in ("use_dora", "bias", "peft_type"):
        assert any(field in p for p in err.problems), field
    world.then_valid_load_works()


def test_unreadable_config_json(world, copy_of):
    bad = copy_of(world.valid, "badjson")
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    world.reject(CorruptAdapterError, bad)
    world.then_valid_load_works()


def test_config_not_an_object(world, copy_of):
    bad = copy_of(world.valid, "list")
    (bad / "adapter_config.json").write_text(json.dumps(["LORA"]))
    world.reject(CorruptAdapterError, bad)
    world.then_valid_load_works()


# -- does not fit the base model --------------------------------------------------------------------------


def test_shapes_of_a_different_size_model(world, make_adapter):
    other = build_base(ARCH, hidden=48)
    bad = make_adapter(ARCH, "wide", seed=2, base=other, target_modules=["q_proj", "v_proj"])
    err = world.reject(IncompatibleAdapterError, bad)
    assert err.problems and all("shape" in p for p in err.problems)
    assert any("q_proj" in p for p in err.problems) and any("v_proj" in p for p in err.problems)
    world.then_valid_load_works()


def test_rank_in_config_disagrees_with_file(world, copy_of):
    bad = copy_of(world.valid, "rank_lie")
    rewrite_config(bad, r=4)  # the file holds r=8 tensors
    world.reject(IncompatibleAdapterError, bad)
    world.then_valid_load_works()


def test_target_modules_match_nothing(world, copy_of):
    bad = copy_of(world.valid, "nomatch")
    rewrite_config(bad, target_modules=["no_such_proj"])
    world.reject(IncompatibleAdapterError, bad)
    world.then_valid_load_works()


def test_everything_excluded(world, copy_of):
    bad = copy_of(world.valid, "excluded")
    rewrite_config(bad, exclude_modules=["q_proj", "v_proj"])
    world.reject(IncompatibleAdapterError, bad)
    world.then_valid_load_works()


def test_target_regex_hits_a_non_linear_module(world, copy_of):
    bad = copy_of(world.valid, "rotary")
    rewrite_config(bad, target_modules=r".*(q_proj|v_proj|layers\.0\.self_attn)")
    err = world.reject(IncompatibleAdapterError, bad)
    assert any("layers.0.self_attn" in p for p in err.problems)
    world.then_valid_load_works()


def test_rank_above_max_rank(fresh_model, make_adapter):
    model = fresh_model(ARCH)
    manager = AdapterManager(model, max_rank=4)
    ok = make_adapter(ARCH, "r4", seed=3, r=4, target_modules=["q_proj"])
    manager.load_adapter(str(ok), "good")
    world = World(model, manager, ok)
    big = make_adapter(ARCH, "r8", seed=4, r=8, target_modules=["q_proj"])
    err = world.reject(IncompatibleAdapterError, big)
    assert any("8" in p for p in err.problems)
    patterned = make_adapter(
        ARCH, "r2_but_one_16", seed=5, r=2, rank_pattern={"v_proj": 16}, target_modules=["q_proj", "v_proj"]
    )
    world.reject(IncompatibleAdapterError, patterned)
    world.then_valid_load_works()


def test_base_weights_in_file_that_differ_from_ours(world, copy_of):
    """PEFT would overwrite the shared base embedding; loramux must refuse rather than mutate the base."""
    bad = copy_of(world.valid, "embed_overwrite")
    edit_weights(
        bad,
        lambda sd: sd.update({"base_model.model.model.embed_tokens.base_layer.weight": torch.zeros(128, 32)}),
    )
    world.reject(IncompatibleAdapterError, bad)
    world.then_valid_load_works()


def test_tied_base_weight_in_file_that_differs_from_ours(fresh_model, make_adapter):
    """GPT-2 ties lm_head.weight to transformer.wte.weight. A file that carries a different lm_head base weight
    (PEFT would write it into the shared, tied tensor) must be refused like any other base overwrite, not
    silently reported as an unexpected key."""
    model = fresh_model("gpt2")
    manager = AdapterManager(model)
    good = make_adapter("gpt2", "gpt2_good", seed=20, target_modules=["c_attn"])
    manager.load_adapter(str(good), "good")
    world = World(model, manager, good)
    bad = make_adapter("gpt2", "gpt2_head", seed=21, r=4, target_modules=["lm_head", "c_fc"])
    key = "base_model.model.lm_head.base_layer.weight"

    def perturb(sd):
        assert key in sd, sorted(sd)  # PEFT saves the embedding layer it targets
        sd[key] = sd[key] + 0.5

    edit_weights(bad, perturb)
    world.reject(IncompatibleAdapterError, bad)
    world.then_valid_load_works()


# Tensors absent from the file where PEFT would keep its random initialisation (init_lora_weights=True gives
# Linear a random lora_A and Embedding a random lora_embedding_B): loramux cannot reproduce those values.
RANDOM_IN_PEFT = {
    "linear_A_missing": ({"target_modules": ["c_attn", "c_fc"]}, ["h.0.attn.c_attn.lora_A.weight"]),
    "linear_A_missing_with_lora_bias": (
        {"target_modules": ["c_attn", "c_fc"], "lora_bias": True},
        ["h.0.attn.c_attn.lora_A.weight"],
    ),
    "embedding_B_missing": ({"target_modules": ["wte", "c_fc"]}, ["wte.lora_embedding_B"]),
}


@pytest.mark.parametrize("case", list(RANDOM_IN_PEFT))
def test_missing_tensors_that_peft_would_leave_random(case, fresh_model, make_adapter):
    model = fresh_model("gpt2")
    manager = AdapterManager(model)
    good = make_adapter("gpt2", "gpt2_good", seed=30, target_modules=["c_attn"])
    manager.load_adapter(str(good), "good")
    world = World(model, manager, good)
    lora, dropped = RANDOM_IN_PEFT[case]
    bad = make_adapter("gpt2", "partial", seed=31, **lora)
    drop_keys = {f"base_model.model.transformer.{d}" for d in dropped}

    def drop(sd):
        assert drop_keys <= set(sd), sorted(sd)
        return {k: v for k, v in sd.items() if k not in drop_keys}

    edit_weights(bad, drop)
    rewrite_config(bad, init_lora_weights=True)
    world.reject(IncompatibleAdapterError, bad)
    world.then_valid_load_works()


def test_missing_lora_weights_with_random_init(world, copy_of):
    """init_lora_weights=False: PEFT would leave random (non-zero) LoRA weights for targets absent from the file;
    loramux cannot reproduce them and must refuse."""
    bad = copy_of(world.valid, "missing_random")
    rewrite_config(bad, target_modules=["q_proj", "v_proj", "k_proj"], init_lora_weights=False)
    world.reject(IncompatibleAdapterError, bad)
    world.then_valid_load_works()


# -- corrupt files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_weights(world, copy_of, value):
    bad = copy_of(world.valid, "nonfinite")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def poison(sd):
        sd[key] = sd[key].clone()
        sd[key][3, 1] = value

    edit_weights(bad, poison)
    err = world.reject(CorruptAdapterError, bad)
    assert any("v_proj" in p for p in err.problems)
    world.then_valid_load_works()


def test_non_finite_modules_to_save(world, make_adapter):
    bad = make_adapter(ARCH, "nan_head", seed=6, target_modules=["q_proj"], modules_to_save=["lm_head"])
    edit_weights(bad, lambda sd: sd["base_model.model.lm_head.weight"].__setitem__((0, 0), math.nan))
    world.reject(CorruptAdapterError, bad)
    world.then_valid_load_works()


def test_truncated_safetensors(world, copy_of):
    bad = copy_of(world.valid, "truncated")
    path = bad / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    world.reject(CorruptAdapterError, bad)
    world.then_valid_load_works()


def test_garbage_safetensors(world, copy_of):
    bad = copy_of(world.valid, "garbage")
    (bad / "adapter_model.safetensors").write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    world.reject(CorruptAdapterError, bad)
    world.then_valid_load_works()


def test_corrupt_bin(world, make_adapter):
    bad = make_adapter(ARCH, "badbin", seed=7, target_modules=["q_proj"], safe_serialization=False)
    path = bad / "adapter_model.bin"
    path.write_bytes(path.read_bytes()[:100])
    world.reject(CorruptAdapterError, bad)
    world.then_valid_load_works()


def test_non_tensor_bin(world, copy_of):
    bad = copy_of(world.valid, "listbin")
    (bad / "adapter_model.safetensors").unlink()
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": [1, 2, 3]}, bad / "adapter_model.bin")
    world.reject(CorruptAdapterError, bad)
    world.then_valid_load_works()


def test_integer_weights(world, copy_of):
    bad = copy_of(world.valid, "ints")
    edit_weights(bad, lambda sd: {k: v.to(torch.int32) for k, v in sd.items()})
    world.reject(IncompatibleAdapterError, bad)
    world.then_valid_load_works()


# -- missing files ----------------------------------------------------------------------------------------


def test_missing_config(world, copy_of):
    bad = copy_of(world.valid, "noconfig")
    (bad / "adapter_config.json").unlink()
    world.reject(AdapterSourceNotFoundError, bad)
    world.then_valid_load_works()


def test_missing_weights(world, copy_of):
    bad = copy_of(world.valid, "noweights")
    (bad / "adapter_model.safetensors").unlink()
    world.reject(AdapterSourceNotFoundError, bad)
    world.then_valid_load_works()


def test_nonexistent_folder(world, tmp_path):
    world.reject(AdapterSourceNotFoundError, tmp_path / "does" / "not" / "exist")
    world.then_valid_load_works()


def test_nonexistent_subfolder(world):
    world.reject(AdapterSourceNotFoundError, world.valid, subfolder="nope")
    world.then_valid_load_works()


def test_revision_for_a_local_folder(world):
    err = world.reject(InvalidArgumentError, world.valid, revision="main")
    assert err.field == "revision"
    world.then_valid_load_works()


def test_unknown_hub_repo_offline(world, tmp_path):
    """Not a folder, so a Hub repo id; offline with an empty cache it cannot be found."""
    with pytest.raises((AdapterSourceNotFoundError, AdapterSourceUnavailableError)):
        world.manager.load_adapter("nobody/nothing-here", "x", cache_dir=str(tmp_path / "empty-cache"))
    world.assert_unchanged()
    world.then_valid_load_works()


@pytest.mark.parametrize("source", ["", "   "])
def test_empty_source(world, source):
    world.reject(InvalidArgumentError, source)
    world.then_valid_load_works()


# -- names ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "a b", "-x", ".x", "x//y", "/x", "x/", "x/../y", "x/./y", "é", "x" * 129])
def test_invalid_adapter_names(world, name):
    err = world.reject(InvalidArgumentError, world.valid, name=name)
    assert err.field == "name"
    world.then_valid_load_works()


def test_replace_with_a_bad_adapter_keeps_the_old_one(world, copy_of):
    bad = copy_of(world.valid, "bad_replace")
    rewrite_config(bad, use_dora=True)
    world.reject(UnsupportedAdapterError, bad, name="good", replace=True)
    assert world.manager.get_adapter("good").version == 1
