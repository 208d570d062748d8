"""How an adapter arrives: its files fetched through the sources, its config and weights checked against this
base model, its tensors built, all without touching any shared state (a failure leaves nothing behind).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from loramux.core.adapters.adapter import LoadedAdapter, Registration
from loramux.core.adapters.loading import LoadOptions, read_adapter_weights, read_state_dict
from loramux.core.adapters.sources import AdapterLocation, AdapterSource, fetch_adapter_files
from loramux.core.adapters.spec import LoraSpec
from loramux.core.adapters.targeting import resolve_modules_to_save, resolve_targets
from loramux.core.lora.layers import unwrapped_copy


class AdapterBuilder:
    """Builds adapters for one base model, whose modules it indexes once (before any is wrapped)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = dict(model.named_modules())  # original names, captured before any wrapping
        self._base_params = dict(model.named_parameters(remove_duplicate=False))  # tied weights under every name
        output_embeddings = getattr(model, "get_output_embeddings", lambda: None)()
        self._output_embedding_name = next(
            (n for n, m in self.modules.items() if m is output_embeddings and output_embeddings is not None),
            None,
        )

    def build(
        self,
        location: AdapterLocation,
        name: str,
        options: LoadOptions,
        *,
        sources: Sequence[AdapterSource],
        pinned: bool = False,
        on_demand: bool = False,
    ) -> LoadedAdapter:
        """The adapter's weights, with a draft registration made of what was asked (the manager keeps it for a
        new name, or puts the adapter under the name's existing registration)."""
        files = fetch_adapter_files(location, sources)
        spec = LoraSpec.from_file(files.config)
        targets = resolve_targets(spec, self.modules, output_embedding_name=self._output_embedding_name)
        saved = resolve_modules_to_save(spec, self.modules)
        state = read_state_dict(files.weights, options.read_device or next(self.model.parameters()).device)
        loaded = read_adapter_weights(
            spec=spec,
            targets=targets,
            saved_module_names=saved,
            state=state,
            modules=self.modules,
            base_params=self._base_params,
            adapter_name=name,
            options=options,
            copy_module=unwrapped_copy,
        )
        adapter = LoadedAdapter(
            registration=None,  # type: ignore[arg-type]  # set just below, from the adapter itself
            files=files,
            spec=spec,
            targets=targets,
            weights=loaded.weights,
            missing_keys=loaded.missing_keys,
            unexpected_keys=loaded.unexpected_keys,
        )
        adapter.registration = Registration(
            name=name,
            location=location,
            options=options,
            sources=tuple(sources),
            summary=adapter.summary(),
            fingerprint=files.fingerprint,
            pinned=pinned,
            on_demand=on_demand,
        )
        return adapter


def ephemeral_device(requested: bool) -> torch.device | None:
    """PEFT's ephemeral_gpu_offload: the load-time casts on CUDA when there is one."""
    return torch.device("cuda") if requested and torch.cuda.is_available() else None
