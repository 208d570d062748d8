"""The command line: ``--help`` prints every flag, and the kernel flags land in the engine's config."""

from __future__ import annotations

import pytest

from loramux.core.lora.kernel_choice import LoraKernel
from loramux.core.model.linear_kernels import LinearKernel
from loramux.core.model.native_layers import DecodeLayers
from loramux.service import __main__ as service_main


def test_help_prints_every_flag(capsys) -> None:
    parser = service_main.build_parser()
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    flags = [flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")]
    assert flags and [f for f in flags if f not in text] == []
    assert "10% of the memory available" in text  # a percent sign in a help text, escaped


def test_kernel_flags_reach_the_engine_config(tmp_path) -> None:
    parse = service_main.build_parser().parse_args
    default = service_main.config_from_args(parse(["--model", str(tmp_path)]), {}).engine
    assert (default.lora_kernel, default.linear_kernel) == (LoraKernel.AUTO, LinearKernel.AUTO)
    args = parse(["--model", str(tmp_path), "--lora-kernel", "torch", "--linear-kernel", "onednn"])
    chosen = service_main.config_from_args(args, {}).engine
    assert (chosen.lora_kernel, chosen.linear_kernel) == (LoraKernel.TORCH, LinearKernel.ONEDNN)
    assert (chosen.ragged_attention, chosen.lean_decode_step, chosen.huge_page_weights) == (True, True, True)
    kept = service_main.config_from_args(parse(["--model", str(tmp_path), "--no-huge-page-weights"]), {}).engine
    assert kept.huge_page_weights is False
    assert default.decode_layers is DecodeLayers.AUTO
    native = service_main.config_from_args(parse(["--model", str(tmp_path), "--decode-layers", "native"]), {}).engine
    assert native.decode_layers is DecodeLayers.NATIVE


def test_an_unknown_lora_kernel_is_refused(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        service_main.build_parser().parse_args(["--lora-kernel", "fast"])
    assert done.value.code == 2
    assert "--lora-kernel: invalid choice: 'fast'" in capsys.readouterr().err
