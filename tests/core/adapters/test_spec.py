"""LoraSpec.from_dict: what PEFT 0.21 writes is accepted; anything loramux cannot compute exactly as PEFT does is
refused with ONE UnsupportedAdapterError whose .problems names every offending field."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from peft import LoraConfig

from loramux.core.adapters.spec import LoraSpec
from loramux.core.errors import UnsupportedAdapterError


def peft_dict(**kwargs: Any) -> dict[str, Any]:
    """LoraConfig(...).to_dict() as it would read back from adapter_config.json (sets -> lists, enums -> str)."""
    kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    raw = LoraConfig(**kwargs).to_dict()
    return json.loads(json.dumps(raw, default=sorted))


def rejected(raw: dict[str, Any]) -> UnsupportedAdapterError:
    with pytest.raises(UnsupportedAdapterError) as info:
        LoraSpec.from_dict(raw)
    err = info.value
    assert err.reason == "ADAPTER_UNSUPPORTED"
    assert err.problems, "an UnsupportedAdapterError must list its problems"
    return err


def problems_mentioning(err: UnsupportedAdapterError, field: str) -> list[str]:
    return [p for p in err.problems if field in p]


# -- accepted --------------------------------------------------------------------------------------------


def test_accepts_full_default_peft_config():
    raw = peft_dict()
    assert set(raw) >= {"peft_type", "r", "lora_alpha", "use_dora", "layer_replication", "target_parameters"}
    spec = LoraSpec.from_dict(raw)
    assert spec.r == 8 and spec.lora_alpha == 8 and not spec.use_rslora
    assert set(spec.target_modules) == {"q_proj", "v_proj"}
    assert spec.rank_pattern == () and spec.alpha_pattern == ()
    assert spec.exclude_modules is None and spec.layers_to_transform is None
    assert spec.modules_to_save == () and not spec.lora_bias


def test_accepts_a_config_written_by_save_pretrained(make_adapter):
    folder = make_adapter("llama", seed=1, target_modules=["q_proj"], task_type="CAUSAL_LM")
    raw = json.loads((folder / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["task_type"] == "CAUSAL_LM"
    spec = LoraSpec.from_file(folder / "adapter_config.json")
    assert spec.target_modules == ("q_proj",)
    assert spec.init_lora_weights is False


def test_accepts_every_supported_feature_and_keeps_pattern_order():
    raw = peft_dict(
        r=16,
        lora_alpha=32,
        use_rslora=True,
        rank_pattern={"^model.layers.0.self_attn.q_proj": 2, "q_proj": 4},
        alpha_pattern={"v_proj": 3},
        target_modules=["q_proj", "v_proj", "model.layers.1.mlp.down_proj"],
        exclude_modules=["model.layers.1.self_attn.v_proj"],
        layers_to_transform=[0, 1],
        layers_pattern="layers",
        modules_to_save=["lm_head"],
        lora_bias=True,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        lora_dropout=0.1,
    )
    # adapter_config.json is written with sorted keys; the order that matters is the file's.
    raw["rank_pattern"] = {"q_proj": 4, "^model.layers.0.self_attn.q_proj": 2}
    spec = LoraSpec.from_dict(raw)
    assert [k for k, _ in spec.rank_pattern] == ["q_proj", "^model.layers.0.self_attn.q_proj"]
    assert spec.layers_pattern == ("layers",)
    assert spec.layers_to_transform == (0, 1)
    assert spec.modules_to_save == ("lm_head",)
    assert spec.lora_bias


@pytest.mark.parametrize("target", ["all-linear", "ALL-LINEAR", r".*\.(q|v)_proj"])
def test_accepts_string_target_modules(target):
    spec = LoraSpec.from_dict(peft_dict(target_modules=target))
    assert spec.target_modules == target
    assert spec.targets_all_linear == (target.lower() == "all-linear")


@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal"])
def test_accepts_plain_inits(init):
    assert LoraSpec.from_dict({**peft_dict(), "init_lora_weights": init}).init_lora_weights == init


def test_accepts_unknown_fields_left_at_default():
    raw = {**peft_dict(), "some_future_option": None, "another_future_flag": False}
    LoraSpec.from_dict(raw)


def test_rank_and_alpha_resolve_like_peft():
    from peft.utils.other import get_pattern_key

    rank_pattern = {"^model.layers.0.self_attn.q_proj": 2, "q_proj": 4, r"layers\.1\..*": 6}
    alpha_pattern = {"v_proj": 3, r"layers\.0\..*": 5}
    spec = LoraSpec.from_dict(
        {**peft_dict(r=8, lora_alpha=16), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    )
    names = [
        f"model.layers.{i}.{m}"
        for i in (0, 1)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "self_attn.o_proj")
    ]
    for name in names:
        want_r = rank_pattern.get(get_pattern_key(list(rank_pattern), name), 8)
        want_alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), name), 16)
        assert spec.rank_and_alpha(name) == (want_r, want_alpha), name
    assert spec.rank_and_alpha("model.layers.0.self_attn.q_proj") == (2, 5)  # r and alpha independently
    assert spec.rank_and_alpha("model.layers.1.self_attn.q_proj") == (4, 16)  # first match wins, not the last


def test_scaling_plain_and_rslora():
    plain = LoraSpec.from_dict(peft_dict(r=4, lora_alpha=16))
    rs = LoraSpec.from_dict(peft_dict(r=4, lora_alpha=16, use_rslora=True))
    assert plain.scaling(4, 16.0) == pytest.approx(4.0)
    assert rs.scaling(4, 16.0) == pytest.approx(16 / math.sqrt(4))


# -- rejected --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("peft_type", ["LOHA", "lora", "IA3", None], ids=str)
def test_rejects_other_peft_types(peft_type):
    raw = peft_dict()
    raw["peft_type"] = peft_type
    err = rejected(raw)
    assert problems_mentioning(err, "peft_type")


def test_rejects_missing_peft_type():
    raw = peft_dict()
    del raw["peft_type"]
    assert problems_mentioning(rejected(raw), "peft_type")


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_rejects_base_bias_training(bias):
    assert problems_mentioning(rejected(peft_dict(bias=bias)), "bias")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq"])
def test_rejects_base_mutating_inits(init):
    raw = {**peft_dict(), "init_lora_weights": init}
    assert problems_mentioning(rejected(raw), "init_lora_weights")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("use_dora", True),
        ("layer_replication", [[0, 1], [0, 1]]),
        ("target_parameters", ["feed_forward.experts.gate_up_proj"]),
        ("trainable_token_indices", [1, 2]),
        ("alora_invocation_tokens", [5, 6]),
        ("arrow_config", {"top_k": 2}),
        ("use_qalora", True),
        ("use_bdlora", {"nblocks": 2}),
        ("ensure_weight_tying", True),
    ],
)
def test_rejects_variants(field, value):
    raw = {**peft_dict(), field: value}
    err = rejected(raw)
    assert problems_mentioning(err, field)
    assert len(err.problems) == 1


def test_rejects_unknown_non_default_field():
    raw = {**peft_dict(), "frobnicate_lora": 3}
    assert problems_mentioning(rejected(raw), "frobnicate_lora")


def test_one_error_lists_every_problem():
    raw = peft_dict()
    raw.update(
        peft_type="LOHA",
        bias="all",
        init_lora_weights="pissa",
        use_dora=True,
        layer_replication=[[0, 1]],
        target_parameters=["experts.down_proj"],
        frobnicate_lora=1,
    )
    err = rejected(raw)
    for field in (
        "peft_type",
        "bias",
        "init_lora_weights",
        "use_dora",
        "layer_replication",
        "target_parameters",
        "frobnicate_lora",
    ):
        assert problems_mentioning(err, field), f"{field} missing from {err.problems}"
    assert len(err.problems) == 7
    for field in ("peft_type", "use_dora", "frobnicate_lora"):
        assert field in str(err)


def test_rejects_malformed_values_together():
    raw = peft_dict()
    raw.update(r=0, lora_alpha="big", rank_pattern={"q_proj": -1}, target_modules=None)
    err = rejected(raw)
    for field in ("r must", "lora_alpha", "rank_pattern", "target_modules"):
        assert problems_mentioning(err, field), f"{field} missing from {err.problems}"


def test_rejects_layers_to_transform_with_regex_targets():
    raw = {**peft_dict(target_modules=r".*q_proj"), "layers_to_transform": [0]}
    assert problems_mentioning(rejected(raw), "layers_to_transform")
