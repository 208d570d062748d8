"""The engine's kernel flags: which code runs the decode step's pieces. Parsed by ``__main__`` with the rest."""

from __future__ import annotations

import argparse
from typing import Any

from loramux.core import EngineConfig
from loramux.core.lora.kernel_choice import LoraKernel
from loramux.core.model.linear_kernels import LinearKernel
from loramux.core.model.native_layers import DecodeLayers

_ENGINE = EngineConfig()


def add_kernel_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--no-ragged-attention",
        dest="ragged_attention",
        action="store_false",
        help="decode steps attend over the whole left-padded cache, not each row's own columns",
    )
    g.add_argument(
        "--no-lean-decode-step", dest="lean_decode_step", action="store_false", help="decode steps call the forward"
    )
    g.add_argument(
        "--no-huge-page-weights",
        dest="huge_page_weights",
        action="store_false",
        help="leave the model's weights on the pages loading put them on (default: moved at startup into memory "
        "advised for 2 MiB transparent huge pages)",
    )
    kernel = _ENGINE.linear_kernel.value
    g.add_argument(
        "--linear-kernel",
        choices=[k.value for k in LinearKernel],
        default=kernel,
        help=(
            "GEMM for the model's linear layers on CPU: auto times oneDNN, torch's and the native kernel on the "
            "model's shapes at startup and runs each layer, at each row count, on the fastest; onednn keeps a "
            "packed copy of each linear weight (one more copy of their memory); torch: MKL, as transformers and "
            "PEFT; native: loramux's fp32 kernel for up to 64 rows (AVX-512, built with gcc at startup, cached in "
            f"~/.cache/loramux; startup fails without it), torch's beyond (default {kernel})"
        ),
    )
    layers = _ENGINE.decode_layers.value
    g.add_argument(
        "--decode-layers",
        choices=[k.value for k in DecodeLayers],
        default=layers,
        help=(
            "how the lean decode step runs each layer's norms, projections, rotation and MLP: native runs them as "
            "two C calls a layer on the native linear kernel (AVX-512, built with gcc at startup; logits within "
            "fp32 rounding of the forward's, checked at startup) wherever the layer carries no LoRA route; auto "
            "times the step both ways at startup and keeps native layers at the batch sizes where they were "
            "faster (never under --linear-kernel torch or onednn); torch: torch's ops "
            f"(default {layers})"
        ),
    )
    lora = _ENGINE.lora_kernel.value
    g.add_argument(
        "--lora-kernel",
        choices=[k.value for k in LoraKernel],
        default=lora,
        help=(
            "what adds a decode step's LoRA deltas for rows sharing adapters (fp32 on CPU): auto builds the native "
            "C kernel at startup with gcc (cached in ~/.cache/loramux) and keeps it if it was faster than torch's "
            f"ops on the model's shapes; native: required, startup fails without it; torch: never built (default "
            f"{lora})"
        ),
    )


def kernel_settings(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig's keyword arguments from the parsed flags above."""
    return {
        "linear_kernel": LinearKernel(args.linear_kernel),
        "lora_kernel": LoraKernel(args.lora_kernel),
        "ragged_attention": args.ragged_attention,
        "lean_decode_step": args.lean_decode_step,
        "decode_layers": DecodeLayers(args.decode_layers),
        "huge_page_weights": args.huge_page_weights,
    }
