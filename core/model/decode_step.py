"""A decode step for Llama-family models without transformers' per-call machinery, equal to the model's forward.

A decode step feeds one token per row through the whole model, and on a small model on CPU the framework around
the ops costs as much as many of them: the model's forward passes through output-capturing and config-default
decorators, builds the attention mask through transformers' mask interface, wraps outputs in dataclasses and
calls every container as a module (bench model, 8 rows, Intel Xeon: 16.0 -> 15.0 ms a step from that alone).
``LlamaDecodeStep`` runs the same computation for models whose decoder layers are Llama's (or Mistral's or
Qwen2's, the same structure): it calls the model's own leaf modules (embedding, rotary embedding, norms, the
projections and the MLP, the head) in the order their forward calls them, with the same tensors, so LoRA routes
on those modules and the fused q/k/v and gate/up GEMMs work unchanged, and the logits are the forward's, bit for
bit. Where q/k/v or gate/up are fused (fused_linears.py) and carry no route, the step takes views of the one
GEMM's output instead of the members' copied slices, and rotates q and k together (8 rows: 1.08x the forward,
one row 1.11x; BENCHMARKS.md). ``decode_step_for`` checks the structure, then runs a probe (padded rows, ragged
runs, every fused group forced to one GEMM) that must give exactly the forward's logits; anything else keeps the
forward.

A fused group with routes on its members still runs as its one GEMM when each route adds its delta into a
column slice of the output (``Route.adds_into``: a single adapter, and the native grouped kernel, whose rows
take a row stride), so the step takes views as without adapters and skips the members' module calls and
copied slices (8 rows on 8 distinct adapters, engine, Intel Xeon: 616 against 545 tok/s; BENCHMARKS
"Session 23"). Routes that do not (torch's gathered stacks or grouped ops) run through the members' calls.

A routing plan with a route on a module the step does not call (a decoder layer, its attention or the model
itself as ``modules_to_save``) makes the step fall back to the forward: ``covers``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from loramux.core.model.fused_linears import SIBLINGS, FusedSiblings, fused_groups
from loramux.core.model.kv_batch import next_positions, prefill_positions
from loramux.core.model.kv_cache import GrowableLayer
from loramux.core.model.linear_kernels import FUSED
from loramux.core.model.native_layers import NativeDecodeLayers, NativeLoras, add_into_columns
from loramux.core.model.ragged_attention import NAME as RAGGED
from loramux.core.model.ragged_attention import SEGMENTS_KWARG, Segment

log = logging.getLogger(__name__)

# decoder layers whose forward is Llama's: norm, attention (q/k/v, rotary, cache, SDPA, o), residual, norm, MLP,
# residual; Qwen2's adds q/k/v biases (inside the projections) and a sliding window that is off unless configured
LAYER_CLASSES: Final = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"})
MLP_CLASSES: Final = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP"})  # forward: down(act(gate(x)) * up(x))
QKV, GATE_UP = SIBLINGS
RMS_NORMS: Final = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"})  # weight * x / rms(x), fp32
ATTENTION: Final = frozenset({"sdpa", RAGGED})  # the mask below is SDPA's: a boolean (N, 1, 1, S), or none


def _base(module: Any) -> Any:
    """The module a RoutedModule wraps (a container's own forward is bypassed: ``covers`` checks its route)."""
    return getattr(module, "_base", module)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaDecodeStep:
    """logits (N, V) of one new token per row, as ``model(input_ids=ids, ...)`` computes them."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.inner = _base(model.model)
        self.config = config = model.config
        self.heads = (config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads))
        count = config.num_hidden_layers
        # the containers whose forward this step replaces: a route on one of them needs the model's forward
        self.bypassed = frozenset(
            {"", "model"}
            | {f"model.layers.{i}" for i in range(count)}
            | {f"model.layers.{i}.self_attn" for i in range(count)}
        )
        # per layer, the modules whose routes the step looks up: a fused group runs as one GEMM where each of
        # its members' routes adds into its columns (Route.adds_into), else the members' own calls
        self.qkv_names = [tuple(f"model.layers.{i}.self_attn.{n}" for n in QKV) for i in range(count)]
        self.mlp_names = [
            (f"model.layers.{i}.mlp", *(f"model.layers.{i}.mlp.{n}" for n in (*GATE_UP, "down_proj")))
            for i in range(count)
        ]
        self.o_names = [f"model.layers.{i}.self_attn.o_proj" for i in range(count)]
        self.norm_op = _rms_norm_op_matches(self.inner.norm)
        self.native: NativeDecodeLayers | None = None  # set where the probe accepted them (native_layers_for)

    def covers(self, routes: Mapping[str, Any]) -> bool:
        """Whether a plan with these routes runs here (no route on a module whose forward this step skips)."""
        return not any(name in self.bypassed for name in routes)

    def __call__(
        self,
        ids: Tensor,
        *,
        positions: Tensor,
        mask: Tensor,
        cache: Any,
        segments: list[Segment] | None,
        routes: Mapping[str, Any],
    ) -> Tensor:
        """ids, positions (N, 1); mask (N, S) with the new column; cache: the batch's (updated in place);
        routes: the active plan's (``covers`` them)."""
        inner = self.inner
        rows = ids.shape[0]
        x = inner.embed_tokens(ids)  # (N, 1, d)
        cos, sin = inner.rotary_emb(x, positions)  # (N, 1, D) each
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (N, 1, 1, D): broadcast over heads
        # SDPA's mask as transformers builds it for one query token: none when no column is padding
        attend = None if bool(mask.all()) else mask.bool()[:, None, None, :]  # (N, 1, 1, S)
        extra = {SEGMENTS_KWARG: segments} if segments is not None else {}
        attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        native = self.native
        # (N, S): what native attention reads; runs apply where SDPA gets a mask, as ragged attention's do
        kv_mask = _attended(mask, segments if attend is not None else None) if native is not None else mask
        for i, layer in enumerate(inner.layers[: self.config.num_hidden_layers]):
            layer = _base(layer)
            attn = _base(layer.self_attn)
            lora = native.routes_of(i, rows, routes, x) if native is not None else None
            own = cache.layers[attn.layer_idx] if attn.layer_idx < len(cache.layers) else None
            if (lora is True or isinstance(lora, NativeLoras)) and isinstance(own, GrowableLayer):
                x = native.whole_layer(i, x, cos, sin, lora, own, kv_mask, attn.scaling)  # type: ignore[union-attr]
                continue  # the whole layer, attention over the cache included, in one native call
            if lora is not None:  # norm, q/k/v and rotation in native calls (native_layers.py)
                q, k, v = self._split(native.attention_inputs(i, x, cos, sin, lora), attn.head_dim)  # type: ignore[union-attr]
            else:
                h = self._norm(layer.input_layernorm, x)  # (N, 1, d)
                q, k, v = self._qkv(attn, h, cos, sin, [routes.get(n) for n in self.qkv_names[i]])
            k, v = cache.update(k, v, attn.layer_idx)  # (N, Hkv, S, D)
            o, _ = attention(attn, q, k, v, attend, dropout=0.0, scaling=attn.scaling, **extra)  # (N, 1, H, D)
            o = o.reshape(rows, 1, -1).contiguous()  # (N, 1, H D)
            if lora is not None:  # o_proj, the residual, norm and MLP in native calls
                x = native.attention_output_and_mlp(i, x, o, lora)  # type: ignore[union-attr]
                continue
            o_name, mlp_names = self.o_names[i], self.mlp_names[i]
            x = x + _linear(attn.o_proj, routes.get(o_name), o)
            h = self._norm(layer.post_attention_layernorm, x)
            x = x + self._mlp(layer.mlp, h, [routes.get(n) for n in mlp_names])
        return self.model.lm_head(self._norm(inner.norm, x))[:, -1, :]

    def _norm(self, norm: Any, x: Tensor) -> Tensor:
        """norm(x); an RMSNorm (unwrapped: no route on it) as torch's one rms_norm op where that computed the
        module's output bit for bit at start (``norm_op``): 18 against 26 us a call, 17 calls a step."""
        if self.norm_op and type(norm).__name__ in RMS_NORMS:
            return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
        return norm(x)

    def _qkv(self, attn: Any, h: Tensor, cos: Tensor, sin: Tensor, routes: list[Any]) -> tuple[Tensor, ...]:
        """Rotated q (N, H, 1, D), k (N, Hkv, 1, D) and v; routes: q's, k's and v's (None: unrouted). Fused
        q/k/v: views of the one GEMM's output (each route's delta added into its columns), q and k rotated
        together (elementwise, so each value is what rotating each alone gives)."""
        rows, (heads, kv_heads), dim = h.shape[0], self.heads, attn.head_dim
        group = _fused_group(attn, QKV, h, routes)
        if group is None:
            shape = (rows, 1, -1, dim)
            q = attn.q_proj(h).view(shape).transpose(1, 2)
            k = attn.k_proj(h).view(shape).transpose(1, 2)
            v = attn.v_proj(h).view(shape).transpose(1, 2)
            return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin), v
        y = _routed_gemm(group, h, routes)  # (N, 1, (H + 2 Hkv) D)
        split = (heads + kv_heads) * dim
        qk = y[..., :split].view(rows, 1, heads + kv_heads, dim).transpose(1, 2)  # (N, H + Hkv, 1, D)
        qk = (qk * cos) + (_rotate_half(qk) * sin)
        return qk[:, :heads], qk[:, heads:], y[..., split:].view(rows, 1, kv_heads, dim).transpose(1, 2)

    def _split(self, y: Tensor, dim: int) -> tuple[Tensor, ...]:
        """Views q (N, H, 1, D), k and v (N, Hkv, 1, D) of y (N, 1, (H + 2 Hkv) D)."""
        (heads, kv_heads), rows = self.heads, y.shape[0]
        y = y.view(rows, 1, heads + 2 * kv_heads, dim).transpose(1, 2)  # (N, H + 2 Hkv, 1, D)
        return y[:, :heads], y[:, heads : heads + kv_heads], y[:, heads + kv_heads :]

    def _mlp(self, mlp: Any, h: Tensor, routes: list[Any]) -> Tensor:
        """The MLP's output (N, 1, d): down(act(gate(h)) * up(h)), gate and up as views of one GEMM's output
        when they are fused (each route's delta added into its columns); routes: the MLP's own (a saved copy
        of it: its module runs), gate's, up's and down's."""
        own, gate_up, down = routes[0], routes[1:3], routes[3]
        group = _fused_group(mlp, GATE_UP, h, gate_up) if own is None and type(mlp).__name__ in MLP_CLASSES else None
        if group is None:
            return mlp(h)
        y = _routed_gemm(group, h, gate_up)  # (N, 1, 2 I)
        gate = group.sizes[0]
        return _linear(mlp.down_proj, down, mlp.act_fn(y[..., :gate]) * y[..., gate:])


def _attended(mask: Tensor, segments: list[Segment] | None) -> Tensor:
    """mask (N, S) as int64, contiguous, with the columns before each ragged run's last ``width`` zeroed: the
    columns its attention reads (ragged_attention.py)."""
    if not segments:
        return mask.to(torch.int64).contiguous()
    attended = mask.to(torch.int64, copy=True).contiguous()
    for first, end, width in segments:
        attended[first:end, : attended.shape[1] - width] = 0
    return attended


def _linear(module: Any, route: Any, x: Tensor) -> Tensor:
    """module(x) (N, 1, out); a route that adds into its base output runs here, without the module's call."""
    if route is None or not route.adds_into(x):
        return module(x)
    out = _base(module)(x)
    route.add_into(x, out.view(out.shape[0], -1))  # a linear's fresh (N, 1, out) output
    return out


def _routed_gemm(group: FusedSiblings, h: Tensor, routes: list[Any]) -> Tensor:
    """The group's one GEMM over h with each member's route (if any) added into that member's columns."""
    y = group.layer(h)  # (N, 1, sum out)
    add_into_columns(routes, h, y, group.sizes)
    return y


def _rms_norm_op_matches(norm: Any) -> bool:
    """Whether F.rms_norm gives this RMSNorm module's output bit for bit (rows of several magnitudes)."""
    if type(norm).__name__ not in RMS_NORMS or not hasattr(norm, "variance_epsilon"):
        return False
    weight = norm.weight
    x = torch.randn(5, 1, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight)
    x = x * torch.tensor([1e-3, 1.0, 30.0, 1.0, 0.1]).view(5, 1, 1).to(weight)
    with torch.no_grad():
        return torch.equal(F.rms_norm(x, (x.shape[-1],), weight, norm.variance_epsilon), norm(x))


def _fused_group(parent: Any, names: tuple[str, ...], h: Tensor, routes: list[Any]) -> FusedSiblings | None:
    """The FusedSiblings of parent's ``names`` (in that order) when it runs as one GEMM at h's rows and each
    member's route (if any) adds into a column slice of its output, else None."""
    members = [_base(getattr(parent, name)) for name in names]
    group = members[0].__dict__.get(FUSED)
    if group is None or group.members != members or not group.usable_at(h.numel() // h.shape[-1]):
        return None
    if not all(route is None or route.adds_into(h) for route in routes):
        return None
    return group


def forward_logits(
    model: Any, ids: Tensor, *, positions: Tensor, mask: Tensor, cache: Any, segments: list[Segment] | None
) -> Tensor:
    """The model's forward over one decode step: logits (N, V) of the last token (segments: ragged runs)."""
    extra = {SEGMENTS_KWARG: segments} if segments is not None else {}
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "past_key_values": cache}
    return model(**inputs, use_cache=True, **extra).logits[:, -1, :]


def _unsupported(model: nn.Module) -> list[str]:
    """Why the step cannot stand in for this model's forward (every reason), or [] when it may (the probe
    decides)."""
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if config is None or inner is None or not hasattr(model, "lm_head"):
        return [f"{type(model).__name__} is not a decoder-only model with .model and .lm_head"]
    inner = _base(inner)
    reasons = []
    layers = list(getattr(inner, "layers", []))
    kinds = {type(_base(layer)).__name__ for layer in layers}
    if not layers or not kinds <= LAYER_CLASSES:
        reasons.append(f"decoder layers {sorted(kinds)} (supported: {sorted(LAYER_CLASSES)})")
    for name in ("embed_tokens", "rotary_emb", "norm"):
        if not hasattr(inner, name):
            reasons.append(f"no model.{name}")
    if getattr(config, "_attn_implementation", None) not in ATTENTION:
        reasons.append(f"attention {getattr(config, '_attn_implementation', None)!r} (supported: sdpa)")
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        reasons.append("sliding-window attention")
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        reasons.append("layers that are not full attention")
    if getattr(config, "pretraining_tp", 1) != 1:
        reasons.append("pretraining_tp != 1")
    return reasons


def decode_step_for(model: nn.Module) -> LlamaDecodeStep | None:
    """The step for this model when it computes exactly what the model's forward does (logged), else None."""
    reasons = _unsupported(model)
    step = None
    if not reasons:
        step = LlamaDecodeStep(model)
        try:
            problem = probe_step(model, step, close=torch.equal)
        except Exception as exc:  # an architecture the step reads wrongly
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            reasons.append(problem)
    if reasons:
        log.info("decode steps run the model's forward (%s): %s", type(model).__name__, "; ".join(reasons))
        return None
    log.info("decode steps run loramux's Llama decode step (%s)", type(model).__name__)
    return step


def probe_step(model: Any, step: LlamaDecodeStep, *, close: Callable[[Tensor, Tensor], bool]) -> str:
    """'' when three decode steps of padded rows give logits ``close`` to the forward's (torch.equal: bit for
    bit): as configured, in ragged runs, and with every fused group forced to run as one GEMM (its row-count
    table decides in service)."""
    from loramux.core.model.kv_cache import GrowableCache

    device = next(model.parameters()).device
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], device=device)  # (2, 5): row 0 left-padded
    ids = torch.arange(1, 11, device=device).view(2, 5) % model.config.vocab_size
    ragged = model.config._attn_implementation == RAGGED
    tables = [(g, g.fused_rows) for g in fused_groups(model)]
    caches = [GrowableCache(), GrowableCache()]
    logits: list[list[Tensor]] = [[], []]
    try:
        with torch.no_grad():
            for cache in caches:
                model(input_ids=ids, attention_mask=mask, position_ids=prefill_positions(mask), past_key_values=cache)
            grown = mask
            for segments, forced in ((None, False), ([(0, 1, 4), (1, 2, 7)] if ragged else None, False), (None, True)):
                for group, _ in tables if forced else ():
                    group.fused_rows = None  # fused at every row count
                positions = next_positions(grown)
                grown = torch.cat([grown, grown.new_ones(2, 1)], dim=1)
                token = ids[:, -1:]
                logits[0].append(
                    forward_logits(model, token, positions=positions, mask=grown, cache=caches[0], segments=segments)
                )
                logits[1].append(
                    step(token, positions=positions, mask=grown, cache=caches[1], segments=segments, routes={})
                )
    finally:
        for group, table in tables:
            group.fused_rows = table
    for a, b in zip(*logits, strict=True):
        if not close(a, b):
            return f"its logits differ from the forward's by {(a - b).abs().max().item():.3g}"
    return ""
