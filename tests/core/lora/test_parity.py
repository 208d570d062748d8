"""Differential tests: loramux against PEFT 0.21 (the oracle), on Llama, GPT-2 (Conv1D) and Qwen2.

Every adapter is written by PEFT and loaded both ways from the same files. A batch routed through loramux
(adapter rows mixed with bare-base rows) must give, row by row, the logits PEFT gives for that row run alone
with that adapter active (``set_adapter``; ``disable_adapter()`` for base rows). PEFT's own mixed batch is not
used as the oracle: it crashes with modules_to_save when some rows' adapters have no copy of the module.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from torch import nn

from loramux.core import AdapterManager
from loramux.core.adapters import manager as manager_module
from loramux.core.lora.routing import build_plan
from tests.conftest import (
    ARCHS,
    LAYOUT,
    bare_logits,
    edit_weights,
    full_name,
    input_ids,
    peft_model_for,
    peft_row_logits,
    rewrite_config,
    routed_logits,
    sfx,
)

ATOL = 1e-5
RTOL = 1e-5
# An adapter that changes the logits by less than this would make a parity check vacuous.
MIN_EFFECT = 1e-3
# Which plans the batch tests run through: the decode plan's routes (uniform, gathered, grouped) and the
# prefill's segmented route (segmented.py).
PLANS = ["decode", "prefill"]


def use_plans(monkeypatch: pytest.MonkeyPatch, plan: str) -> None:
    if plan == "prefill":
        monkeypatch.setattr(manager_module, "build_plan", functools.partial(build_plan, segmented=True))


@dataclass
class Adapter:
    """One adapter of a case: LoraConfig kwargs, plus optional edits of the saved adapter_config.json."""

    name: str
    lora: dict[str, Any]
    config_updates: dict[str, Any] = field(default_factory=dict)
    save: dict[str, Any] = field(default_factory=dict)  # extra make_adapter options (save_dtype, ...)
    load: dict[str, Any] = field(default_factory=dict)  # extra load_adapter options (subfolder, ...)


def _cases(arch: str) -> dict[str, list[Adapter]]:
    """Every supported feature, spelled with this architecture's module names.

    Adapter names of one case are never substrings of each other: PEFT filters its missing_keys report with a
    substring test on the adapter name."""
    lay = LAYOUT[arch]
    pat = lay["layers_pattern"]
    q, o, up, down = (sfx(arch, r) for r in ("qkv", "o", "up", "down"))
    return {
        "r": [Adapter("rank4", {"r": 4, "target_modules": [q, down]})],
        "lora_alpha": [Adapter("alpha32", {"r": 8, "lora_alpha": 32, "target_modules": [q, o]})],
        "use_rslora": [Adapter("rslora", {"r": 4, "lora_alpha": 16, "use_rslora": True, "target_modules": [q, up]})],
        "rank_pattern_suffix": [
            Adapter("rp_suffix", {"r": 8, "rank_pattern": {o: 2}, "target_modules": [q, o]}),
        ],
        "rank_pattern_anchored_full_name": [
            Adapter(
                "rp_anchor",
                {"r": 8, "rank_pattern": {"^" + full_name(arch, "down", 0): 3}, "target_modules": [q, down]},
            ),
        ],
        "rank_pattern_regex": [
            Adapter(
                "rp_regex",
                {"r": 8, "rank_pattern": {rf"{pat}\.1\..*": 5}, "target_modules": [q, o, down]},
            ),
        ],
        # JSON order, first match wins: the same two keys in both orders give different ranks. The configs are
        # rewritten after saving because save_pretrained sorts keys.
        "rank_pattern_first_match_wins": [
            Adapter(
                "first_anchor",
                {"r": 8, "rank_pattern": {"^" + full_name(arch, "qkv", 0): 2, q: 4}, "target_modules": [q]},
                config_updates={"rank_pattern": {"^" + full_name(arch, "qkv", 0): 2, q: 4}},
            ),
            Adapter(
                "first_suffix",
                {"r": 8, "rank_pattern": {q: 4, "^" + full_name(arch, "qkv", 0): 2}, "target_modules": [q]},
                config_updates={"rank_pattern": {q: 4, "^" + full_name(arch, "qkv", 0): 2}},
            ),
        ],
        # r and alpha resolve independently: q gets a pattern r with the global alpha in layer 0 and a pattern
        # alpha in layer 1; o gets the global r with a pattern alpha. Same with rsLoRA.
        "alpha_pattern_independent": [
            Adapter(
                "ap_plain",
                {
                    "r": 8,
                    "lora_alpha": 8,
                    "rank_pattern": {q: 2},
                    "alpha_pattern": {o: 32, "^" + full_name(arch, "qkv", 1): 4},
                    "target_modules": [q, o],
                },
            ),
            Adapter(
                "ap_rslora",
                {
                    "r": 8,
                    "lora_alpha": 8,
                    "use_rslora": True,
                    "rank_pattern": {q: 2},
                    "alpha_pattern": {o: 32, "^" + full_name(arch, "qkv", 1): 4},
                    "target_modules": [q, o],
                },
            ),
        ],
        "alpha_pattern_only": [
            Adapter("ap_only", {"r": 4, "alpha_pattern": {rf"{pat}\.0\..*": 24}, "target_modules": [q, down]}),
        ],
        "target_modules_suffix_list": [
            Adapter("suffixes", {"target_modules": [q, o, up, down]}),
        ],
        # A full dotted name is an exact match and bypasses layers_to_transform; suffixes do not.
        "target_modules_full_names": [
            Adapter(
                "full_names",
                {
                    "target_modules": [full_name(arch, "qkv", 0), full_name(arch, "up", 1), down],
                    "layers_to_transform": [1],
                },
            ),
        ],
        "target_modules_regex": [
            Adapter(
                "regex",
                {
                    "target_modules": rf".*\.(0\.{re.escape(lay['path']['qkv'])}|1\.{re.escape(lay['path']['down'])})",
                },
            ),
        ],
        # PEFT saves the resolved module list; put the "all-linear" shorthand back so both loaders resolve it.
        "target_modules_all_linear": [
            Adapter("linear_lc", {"r": 4, "target_modules": "all-linear"}, {"target_modules": "all-linear"}),
            Adapter("linear_uc", {"r": 2, "target_modules": "all-linear"}, {"target_modules": "ALL-Linear"}),
            Adapter(
                "linear_excl",
                {"r": 3, "target_modules": "all-linear", "exclude_modules": [o, full_name(arch, "up", 1)]},
                {"target_modules": "all-linear"},
            ),
        ],
        "exclude_modules_list": [
            Adapter(
                "excl_list",
                {"target_modules": [q, o, down], "exclude_modules": [full_name(arch, "qkv", 0), down]},
            ),
        ],
        "exclude_modules_regex": [
            Adapter("excl_regex", {"target_modules": [q, up], "exclude_modules": rf".*\.{pat}\.1\..*"}),
        ],
        "layers_to_transform_int": [
            Adapter("layers_int", {"target_modules": [q, down], "layers_to_transform": 1}),
        ],
        "layers_to_transform_list": [
            Adapter("layers_list", {"target_modules": [q, down], "layers_to_transform": [0]}),
        ],
        "layers_pattern": [
            Adapter(
                "lp_list",
                {"target_modules": [q, down], "layers_to_transform": [1], "layers_pattern": pat},
            ),
            Adapter(
                "lp_int",
                {"target_modules": [o, up], "layers_to_transform": 0, "layers_pattern": [pat]},
            ),
            # A layers_pattern naming no module list: suffix matches are dropped, exact names still apply.
            Adapter(
                "lp_none",
                {
                    "target_modules": [full_name(arch, "qkv", 0), down],
                    "layers_to_transform": [0],
                    "layers_pattern": "blocks",
                },
            ),
        ],
        "lora_bias": [Adapter("lora_bias", {"target_modules": [q, down], "lora_bias": True})],
        "embedding": [Adapter("embedding", {"r": 4, "target_modules": [lay["embed"], q]})],
        "embedding_only": [Adapter("embedding_only", {"r": 6, "lora_alpha": 12, "target_modules": [lay["embed"]]})],
        "modules_to_save_lm_head": [
            Adapter("mts", {"target_modules": [q], "modules_to_save": ["lm_head"]}),
        ],
        # PEFT matches modules_to_save with a plain endswith (no dot boundary): "head" wraps lm_head.
        "modules_to_save_suffix": [
            Adapter("mts_suffix", {"target_modules": [o], "modules_to_save": ["head"]}),
        ],
        "modules_to_save_embedding": [
            Adapter("mts_embed", {"r": 4, "target_modules": [q], "modules_to_save": [lay["embed"]]}),
        ],
        # A module in modules_to_save is never also a LoRA target.
        "modules_to_save_wins_over_target": [
            Adapter("mts_target", {"target_modules": [q, "lm_head"], "modules_to_save": ["lm_head"]}),
        ],
        "lora_on_lm_head": [Adapter("head_lora", {"r": 4, "target_modules": ["lm_head", o]})],
        "different_ranks_side_by_side": [
            Adapter("small", {"r": 1, "lora_alpha": 2, "target_modules": [q, o]}),
            Adapter("large", {"r": 16, "lora_alpha": 8, "target_modules": [q, up]}),
            Adapter("medium", {"r": 5, "lora_alpha": 5, "target_modules": [down, q]}),
        ],
        "bin_fallback": [Adapter("pickled", {"target_modules": [q, down]}, save={"safe_serialization": False})],
    }


CASE_NAMES = list(_cases("llama"))


def _make_all(
    arch: str, adapters: list[Adapter], make_adapter: Callable[..., Path], seed: int = 100
) -> dict[str, Path]:
    return {
        a.name: make_adapter(arch, a.name, seed=seed + i, config_updates=a.config_updates, **a.save, **a.lora)
        for i, a in enumerate(adapters)
    }


def _rows_for(names: list[str]) -> list[str | None]:
    """A mixed batch: every adapter at least once, base rows in between, the first adapter twice."""
    rows: list[str | None] = []
    for name in names:
        rows += [name, None] if not rows else [name]
    return [*rows, names[0]]


def assert_parity(
    model: nn.Module,
    manager: AdapterManager,
    peft_model: Any,
    ids: torch.Tensor,
    rows: list[Any],
    *,
    atol: float = ATOL,
    rtol: float = RTOL,
    min_effect: float = MIN_EFFECT,
) -> torch.Tensor:
    names = [r if isinstance(r, str) or r is None else r.name for r in rows]
    got = routed_logits(model, manager, ids, rows)
    want = peft_row_logits(peft_model, ids, names)
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    for i, name in enumerate(names):
        torch.testing.assert_close(
            got[i], want[i], atol=atol, rtol=rtol, msg=lambda m, i=i, n=name: f"row {i} ({n}): {m}"
        )
    base = peft_row_logits(peft_model, ids, [None] * len(names))
    for i, name in enumerate(names):
        if name is not None:
            effect = (want[i] - base[i]).abs().max().item()
            assert effect > min_effect, f"adapter {name} barely changes the logits ({effect}); vacuous test"
    return got


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("arch", ARCHS)
def test_feature_parity_mixed_batch(arch, case, fresh_model, base_models, make_adapter):
    adapters = _cases(arch)[case]
    paths = _make_all(arch, adapters, make_adapter)
    model = fresh_model(arch)
    manager = AdapterManager(model)
    results = {a.name: manager.load_adapter(str(paths[a.name]), a.name, **a.load) for a in adapters}
    peft_model = peft_model_for(base_models[arch], {a.name: (paths[a.name], a.load) for a in adapters})
    for a in adapters:
        # Loading an existing name again only reloads its weights, and returns PEFT's key report.
        theirs = peft_model.load_adapter(str(paths[a.name]), adapter_name=a.name, **a.load)
        assert sorted(results[a.name].missing_keys) == sorted(theirs.missing_keys), a.name
        assert sorted(results[a.name].unexpected_keys) == sorted(theirs.unexpected_keys), a.name
    rows = _rows_for([a.name for a in adapters])
    assert_parity(model, manager, peft_model, input_ids(len(rows)), rows)
    # Outside a routing block the model is the bare base model, bit for bit.
    ids = input_ids(3, seed=7)
    assert torch.equal(bare_logits(model, ids), bare_logits(base_models[arch], ids))


def _key_mix(arch: str) -> list[Adapter]:
    """Adapters that differ in every dimension a per-row router can get wrong."""
    lay = LAYOUT[arch]
    q, o, up, down = (sfx(arch, r) for r in ("qkv", "o", "up", "down"))
    return [
        Adapter("emb", {"r": 4, "target_modules": [lay["embed"], q, down]}),
        Adapter("head_copy", {"r": 8, "target_modules": [q, o], "modules_to_save": ["lm_head"]}),
        Adapter(
            "patterned",
            {
                "r": 16,
                "lora_alpha": 8,
                "use_rslora": True,
                "rank_pattern": {rf"{lay['layers_pattern']}\.0\..*": 3},
                "alpha_pattern": {up: 20},
                "target_modules": [q, up, down],
            },
        ),
        Adapter(
            "tiny_bias", {"r": 1, "lora_alpha": 4, "target_modules": [o], "layers_to_transform": [1], "lora_bias": True}
        ),
    ]


# Route shapes: mixed (gathered per-row stacks), every row one adapter (uniform), and many rows per adapter
# (grouped), with base rows or without.
ROW_LAYOUTS = {
    "mixed": ["emb", None, "head_copy", "patterned", "tiny_bias", None],
    "mixed_no_base": ["tiny_bias", "patterned", "head_copy", "emb", "patterned"],
    "uniform": ["patterned", "patterned", "patterned"],
    "uniform_saved_module": ["head_copy", "head_copy"],
    "grouped": ["emb", "head_copy"] * 4,
    "grouped_with_base": ["patterned", None] * 4 + [None],
    "base_only": [None, None],
}


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("layout", list(ROW_LAYOUTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_equals_each_row_alone_in_peft(
    arch, layout, plan, fresh_model, base_models, make_adapter, monkeypatch
):
    use_plans(monkeypatch, plan)
    model, manager, peft_model = load_key_mix(arch, fresh_model, base_models, make_adapter)
    rows = ROW_LAYOUTS[layout]
    assert_parity(model, manager, peft_model, input_ids(len(rows), seed=11), rows)


def load_key_mix(arch: str, fresh_model, base_models, make_adapter) -> tuple[nn.Module, AdapterManager, Any]:
    """_key_mix's adapters, written by PEFT, loaded into a fresh model's manager and into a PEFT model."""
    adapters = _key_mix(arch)
    paths = _make_all(arch, adapters, make_adapter, seed=300)
    model = fresh_model(arch)
    manager = AdapterManager(model)
    for a in adapters:
        manager.load_adapter(str(paths[a.name]), a.name)
    return model, manager, peft_model_for(base_models[arch], paths)


@pytest.mark.parametrize("arch", ARCHS)
def test_routing_accepts_held_adapters(arch, fresh_model, base_models, make_adapter):
    adapters = _key_mix(arch)[:2]
    paths = _make_all(arch, adapters, make_adapter, seed=400)
    model = fresh_model(arch)
    manager = AdapterManager(model)
    for a in adapters:
        manager.load_adapter(str(paths[a.name]), a.name)
    held = [manager.acquire(a.name) for a in adapters]
    peft_model = peft_model_for(base_models[arch], paths)
    rows = [held[0], None, held[1], held[0]]
    assert_parity(model, manager, peft_model, input_ids(len(rows)), rows)


@pytest.mark.parametrize("save_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_saved_in_half_precision(arch, save_dtype, fresh_model, base_models, make_adapter):
    q, o, down = (sfx(arch, r) for r in ("qkv", "o", "down"))
    paths = {
        "halves": make_adapter(arch, "halves", seed=500, save_dtype=save_dtype, target_modules=[q, down]),
        "head": make_adapter(
            arch, "head", seed=501, save_dtype=save_dtype, target_modules=[o], modules_to_save=["lm_head"]
        ),
    }
    model = fresh_model(arch)
    manager = AdapterManager(model)
    for name, path in paths.items():
        info = manager.load_adapter(str(path), name).info
        assert info.dtype == "float32"  # PEFT's autocast_adapter_dtype: half adapters computed in fp32
    peft_model = peft_model_for(base_models[arch], paths)
    rows = ["halves", None, "head", "halves"]
    assert_parity(model, manager, peft_model, input_ids(len(rows)), rows)


@pytest.mark.parametrize("arch", ARCHS)
def test_subfolder_of_multi_adapter_save(arch, fresh_model, base_models, make_adapter):
    q, o, up = (sfx(arch, r) for r in ("qkv", "o", "up"))
    folder = make_adapter(
        arch,
        "multi",
        seed=600,
        r=4,
        target_modules=[q],
        extra={"second": {"r": 2, "target_modules": [o, up]}, "third": {"r": 8, "target_modules": [up]}},
    )
    assert (folder / "second" / "adapter_config.json").is_file()
    model = fresh_model(arch)
    manager = AdapterManager(model)
    manager.load_adapter(str(folder), "top")
    second = manager.load_adapter(str(folder), "second", subfolder="second").info
    manager.load_adapter(str(folder), "third", subfolder="third")
    assert second.subfolder == "second"
    peft_model = peft_model_for(
        base_models[arch],
        {"top": folder, "second": (folder, {"subfolder": "second"}), "third": (folder, {"subfolder": "third"})},
    )
    rows = ["second", "top", None, "third", "second"]
    assert_parity(model, manager, peft_model, input_ids(len(rows)), rows)


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no_autocast"])
def test_bf16_base_model(autocast, plan, fresh_model, base_models, make_adapter, monkeypatch):
    use_plans(monkeypatch, plan)
    arch = "llama"
    lay = LAYOUT[arch]
    q, o, down = (sfx(arch, r) for r in ("qkv", "o", "down"))
    paths = {
        "plain": make_adapter(arch, "plain", seed=700, r=8, lora_alpha=32, target_modules=[q, down], lora_bias=True),
        "emb": make_adapter(arch, "emb", seed=701, r=4, lora_alpha=16, target_modules=[lay["embed"], o]),
        "head": make_adapter(arch, "head", seed=702, lora_alpha=32, target_modules=[q], modules_to_save=["lm_head"]),
    }
    model = fresh_model(arch).to(torch.bfloat16)
    manager = AdapterManager(model)
    for name, path in paths.items():
        info = manager.load_adapter(str(path), name, autocast_adapter_dtype=autocast).info
        if name != "head":
            assert info.dtype == ("float32" if autocast else "bfloat16")
    peft_base = copy.deepcopy(base_models[arch]).to(torch.bfloat16)
    peft_model = None
    for name, path in paths.items():
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(
                peft_base, str(path), adapter_name=name, autocast_adapter_dtype=autocast
            )
        else:
            peft_model.load_adapter(str(path), name, autocast_adapter_dtype=autocast)
    peft_model.eval()
    rows = ["plain", None, "emb", "head", "plain", None]
    got = assert_parity(
        model, manager, peft_model, input_ids(len(rows), seed=21), rows, atol=2e-2, rtol=2e-2, min_effect=5e-2
    )
    assert got.dtype == torch.bfloat16


def test_missing_and_unexpected_keys_match_peft(fresh_model, base_models, make_adapter):
    """File keys for a module the config does not target -> unexpected_keys (file form); config targets with
    no file keys -> missing_keys in PEFT's in-model form. init_lora_weights=True makes the latter a no-op."""
    from safetensors.torch import load_file, save_file

    arch = "llama"
    folder = make_adapter(arch, "keys", seed=800, target_modules=["q_proj", "v_proj"])
    state = load_file(str(folder / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    extra = {
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.randn(8, 32, generator=gen),
        "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": torch.randn(64, 8, generator=gen),
    }
    save_file({**state, **extra}, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    rewrite_config(folder, target_modules=["q_proj", "v_proj", "k_proj"], init_lora_weights=True)

    name = "adapter_keys"  # not a substring of "lora_" (PEFT's missing-key filter is a substring test)
    model = fresh_model(arch)
    manager = AdapterManager(model)
    ours = manager.load_adapter(str(folder), name)
    peft_model = peft_model_for(base_models[arch], {"first_one": folder})
    theirs = peft_model.load_adapter(str(folder), adapter_name=name)

    assert sorted(ours.missing_keys) == sorted(theirs.missing_keys)
    assert sorted(ours.unexpected_keys) == sorted(theirs.unexpected_keys)
    assert sorted(ours.unexpected_keys) == sorted(extra)
    assert sorted(ours.missing_keys) == sorted(
        f"base_model.model.model.layers.{i}.self_attn.k_proj.lora_{m}.{name}.weight" for i in (0, 1) for m in "AB"
    )
    rows = [name, None, name]
    assert_parity(model, manager, peft_model, input_ids(len(rows)), rows)


# Tensors absent from the file under init_lora_weights=True, where PEFT's initialisation makes the outcome
# deterministic: Linear starts with B=0 (and lora_B.bias=0), so the delta is only the saved bias, if any;
# Embedding starts with lora_embedding_A=0, so the delta is zero whatever B is.
PARTIAL_FILES = {
    "linear_B_missing": ({"target_modules": ["c_attn", "c_fc"]}, "h.0.attn.c_attn.lora_B.weight"),
    "linear_bias_missing": ({"target_modules": ["c_attn", "c_fc"], "lora_bias": True}, "h.0.attn.c_attn.lora_B.bias"),
    "linear_A_B_missing_bias_kept": (
        {"target_modules": ["c_attn", "c_fc"], "lora_bias": True},
        ("h.1.mlp.c_fc.lora_A.weight", "h.1.mlp.c_fc.lora_B.weight"),
    ),
    "embedding_A_missing": ({"target_modules": ["wte", "c_fc"]}, "wte.lora_embedding_A"),
}


@pytest.mark.parametrize("case", list(PARTIAL_FILES))
def test_partial_file_with_default_init_matches_peft(case, fresh_model, base_models, make_adapter):
    arch = "gpt2"
    lora, dropped = PARTIAL_FILES[case]
    dropped = (dropped,) if isinstance(dropped, str) else dropped
    folder = make_adapter(arch, "partial", seed=810, **lora)
    drop_keys = {f"base_model.model.transformer.{d}" for d in dropped}

    def drop(sd):
        assert drop_keys <= set(sd), sorted(sd)
        return {k: v for k, v in sd.items() if k not in drop_keys}

    edit_weights(folder, drop)
    rewrite_config(folder, init_lora_weights=True)
    name = "adapter_p"  # not a substring of anything PEFT's missing-key filter sees
    model = fresh_model(arch)
    manager = AdapterManager(model)
    ours = manager.load_adapter(str(folder), name)
    peft_model = peft_model_for(base_models[arch], {"first_one": folder})
    theirs = peft_model.load_adapter(str(folder), adapter_name=name)
    assert sorted(ours.missing_keys) == sorted(theirs.missing_keys)
    assert len(ours.missing_keys) == len(drop_keys)
    assert ours.unexpected_keys == () and theirs.unexpected_keys == []
    rows = [name, None, name]
    assert_parity(model, manager, peft_model, input_ids(len(rows)), rows)


def test_no_missing_or_unexpected_keys_for_a_clean_adapter(fresh_model, make_adapter):
    model = fresh_model("gpt2")
    manager = AdapterManager(model)
    result = manager.load_adapter(str(make_adapter("gpt2", seed=1, target_modules=["c_attn", "wte"])), "clean")
    assert result.missing_keys == () and result.unexpected_keys == ()


def test_is_trainable_one_sgd_step(fresh_model, make_adapter):
    """One optimizer step through a routed forward changes only the trainable adapter."""
    arch = "llama"
    q, down = sfx(arch, "qkv"), sfx(arch, "down")
    model = fresh_model(arch)
    manager = AdapterManager(model)
    manager.load_adapter(
        str(make_adapter(arch, "tr", seed=900, target_modules=[q, down], modules_to_save=["lm_head"])),
        "tr",
        is_trainable=True,
    )
    manager.load_adapter(str(make_adapter(arch, "frozen", seed=901, target_modules=[q, down])), "frozen")
    trainable, frozen = manager.acquire("tr"), manager.acquire("frozen")
    assert manager.get_adapter("tr").trainable and not manager.get_adapter("frozen").trainable
    assert trainable.parameters() and all(p.requires_grad for p in trainable.parameters())
    assert frozen.parameters() == []
    assert not any(t.requires_grad for t in frozen.weights.tensors())

    rows = ["tr", "frozen", None]
    ids = input_ids(len(rows))
    before = routed_logits(model, manager, ids, rows)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    snapshot = [p.detach().clone() for p in trainable.parameters()]

    optimizer = torch.optim.SGD(trainable.parameters(), lr=0.5)
    train_ids = input_ids(2, seed=99)
    with manager.routing(["tr", "tr"]):
        logits = model(input_ids=train_ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), train_ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None for p in trainable.parameters())
    optimizer.step()

    assert any(not torch.equal(a, b) for a, b in zip(snapshot, trainable.parameters(), strict=True))
    after = routed_logits(model, manager, ids, rows)
    assert (after[0] - before[0]).abs().max() > MIN_EFFECT
    torch.testing.assert_close(after[1], before[1], atol=0, rtol=0)
    torch.testing.assert_close(after[2], before[2], atol=0, rtol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, base_state[key]), f"base weight {key} changed"


def _per_adapter_oracle(base: nn.Module, paths: Mapping[str, Path], ids: torch.Tensor, rows: list[str | None]):
    """Row i through a PeftModel that holds ONLY row i's adapter (PEFT itself cannot hold some combinations,
    e.g. a LoRA target inside another adapter's modules_to_save container)."""
    models = {name: peft_model_for(base, {name: path}) for name, path in paths.items()}
    any_model = next(iter(models.values()))
    return torch.stack(
        [
            peft_row_logits(models[name] if name is not None else any_model, ids[i : i + 1], [name])[0]
            for i, name in enumerate(rows)
        ]
    )


@pytest.mark.parametrize("order", ["lora_first", "container_first"])
@pytest.mark.parametrize("arch", ARCHS)
def test_modules_to_save_container_independent_of_load_order(arch, order, fresh_model, base_models, make_adapter):
    """modules_to_save=["mlp"] keeps a per-adapter copy of a module that has children. Another adapter's LoRA on a
    child of that module (loaded before or after) must neither break the load nor leak into the copy."""
    q, down = sfx(arch, "qkv"), sfx(arch, "down")
    paths = {
        "downlora": make_adapter(arch, "downlora", seed=1000, target_modules=[down]),
        "savedcopy": make_adapter(arch, "savedcopy", seed=1001, target_modules=[q], modules_to_save=["mlp"]),
    }
    model = fresh_model(arch)
    manager = AdapterManager(model)
    names = ["downlora", "savedcopy"] if order == "lora_first" else ["savedcopy", "downlora"]
    for name in names:
        manager.load_adapter(str(paths[name]), name)
    ids = input_ids(4, seed=5)
    for layout in (["downlora", "savedcopy", None, "savedcopy"], ["savedcopy", "savedcopy"], ["downlora", None]):
        got = routed_logits(model, manager, ids[: len(layout)], layout)
        expected = _per_adapter_oracle(base_models[arch], paths, ids[: len(layout)], layout)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_load_options_are_accepted(fresh_model, base_models, make_adapter):
    """PEFT's load_adapter options: torch_device (where the file is read), low_cpu_mem_usage, and
    ephemeral_gpu_offload (no effect without CUDA) change nothing in the result."""
    arch = "qwen2"
    path = make_adapter(arch, "opts", seed=1100, target_modules=[sfx(arch, "qkv"), sfx(arch, "down")])
    model = fresh_model(arch)
    manager = AdapterManager(model)
    manager.load_adapter(str(path), "opts", torch_device="cpu", low_cpu_mem_usage=True, ephemeral_gpu_offload=True)
    peft_model = peft_model_for(base_models[arch], {"opts": path})
    rows = ["opts", None]
    assert_parity(model, manager, peft_model, input_ids(len(rows)), rows)


def test_is_trainable_step_matches_peft(fresh_model, base_models, make_adapter):
    """The same SGD step, taken through a mixed routed batch in loramux and through the adapter's rows alone in
    PEFT (is_trainable=True), leaves both with the same adapter."""
    arch = "llama"
    q, down = sfx(arch, "qkv"), sfx(arch, "down")
    tr = make_adapter(arch, "tr", seed=1200, target_modules=[q, down], modules_to_save=["lm_head"], lora_bias=True)
    frozen = make_adapter(arch, "frozen", seed=1201, target_modules=[q])
    lr = 0.5
    rows = ["tr", "frozen", None]
    ids = input_ids(len(rows), seed=77)
    n_targets = ids.shape[0] * (ids.shape[1] - 1)

    def batch_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1), reduction="sum"
        )

    model = fresh_model(arch)
    manager = AdapterManager(model)
    manager.load_adapter(str(tr), "tr", is_trainable=True)
    manager.load_adapter(str(frozen), "frozen")
    params = manager.acquire("tr").parameters()
    optimizer = torch.optim.SGD(params, lr=lr)
    with manager.routing(rows):
        (batch_loss(model(input_ids=ids).logits, ids) / n_targets).backward()
    optimizer.step()

    peft_model = PeftModel.from_pretrained(
        copy.deepcopy(base_models[arch]), str(tr), adapter_name="tr", is_trainable=True
    )
    peft_model.load_adapter(str(frozen), adapter_name="frozen")
    peft_model.eval()
    peft_params = [p for n, p in peft_model.named_parameters() if re.search(r"\.tr\.", n)]
    assert len(peft_params) == len(params)
    assert all(p.requires_grad for p in peft_params)
    peft_optimizer = torch.optim.SGD(peft_params, lr=lr)
    peft_model.set_adapter("tr")
    # Only row 0 involves "tr": its share of the batch's mean loss carries the whole gradient.
    (batch_loss(peft_model(input_ids=ids[:1]).logits, ids[:1]) / n_targets).backward()
    peft_optimizer.step()

    check = ["tr", None, "frozen", "tr"]
    check_ids = input_ids(len(check), seed=78)
    got = routed_logits(model, manager, check_ids, check)
    want = peft_row_logits(peft_model, check_ids, check)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_and_modules_to_save_on_the_same_module_in_one_batch(arch, fresh_model, base_models, make_adapter):
    """One adapter puts LoRA on lm_head, another keeps its own lm_head copy (modules_to_save): in one batch,
    each row gets exactly its own adapter's lm_head (the copy must not swallow the other adapter's LoRA)."""
    paths = {
        "headlora": make_adapter(arch, "headlora", seed=1300, target_modules=["lm_head"]),
        "headcopy": make_adapter(
            arch, "headcopy", seed=1301, target_modules=[sfx(arch, "qkv")], modules_to_save=["lm_head"]
        ),
    }
    model = fresh_model(arch)
    manager = AdapterManager(model)
    for name, path in paths.items():
        manager.load_adapter(str(path), name)
    ids = input_ids(4, seed=6)
    layout: list[str | None] = ["headlora", "headcopy", None, "headlora"]
    got = routed_logits(model, manager, ids, layout)
    expected = _per_adapter_oracle(base_models[arch], paths, ids, layout)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
