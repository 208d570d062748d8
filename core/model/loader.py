"""Loading the one base causal LM and its tokenizer, from a local folder or a Hugging Face Hub repo id."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
DTYPES: tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelSpec:
    """Which base model to load and how. ``source`` is a folder or a Hub repo id (``owner/name``)."""

    source: str
    dtype: Dtype = "auto"  # "auto": the dtype recorded in the checkpoint's config
    device: str = "auto"  # "auto": cuda when available, else cpu; otherwise any torch device string
    revision: str | None = None  # Hub only
    cache_dir: str | None = None  # Hub cache; None: huggingface_hub's default
    token: str | None = field(default=None, repr=False)  # Hub credential (HF_TOKEN), never logged


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_base_model(spec: ModelSpec) -> tuple[nn.Module, object]:
    """The model (in eval mode, on its device) and its tokenizer. Blocking: call it off the event loop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub = {"revision": spec.revision, "cache_dir": spec.cache_dir, "token": spec.token}
    dtype: str | torch.dtype = "auto" if spec.dtype == "auto" else getattr(torch, spec.dtype)
    device = resolve_device(spec.device)
    log.info("loading base model %s (dtype %s, device %s)", spec.source, spec.dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(spec.source, **hub)
    model = AutoModelForCausalLM.from_pretrained(spec.source, dtype=dtype, **hub)
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    return model, tokenizer
