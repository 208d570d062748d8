"""Native decoder layers for the decode step: each Llama layer in one C call, attention over the KV cache included.

At one row on one thread the decode step spent 5.8 ms of a 13 ms step outside the linear kernel, where the
same torch ops took 1.6-2.6 ms with the GEMMs left out: every GEMM streams weights through the caches, and the
small ops between two of them (about 40 a layer, each a dispatch through Python and torch) then start cold
(Intel Xeon; BENCHMARKS "Session 25"). ``NativeDecodeLayers.whole_layer`` runs a layer's norm, q/k/v GEMMs
and rotation, writes k and v into the KV cache's new column (``GrowableLayer.extend`` makes the room), runs
attention over the cache (native/decode_attention.c), then o_proj, the residual, the second norm and the MLP,
in one call (native/decode_layer.c), with the native linear kernel for every GEMM. Against a cache that is
not growable, two calls (``attention_inputs``, ``attention_output_and_mlp``) around torch's update and SDPA.

The rotation and residual adds round as torch's ops do; the RMSNorms and SiLU sum in their own order, so the
logits agree with the forward's to fp32 rounding, not bit for bit: ``native_layers_for`` runs a probe that
bounds the difference (``TOLERANCE``) and gives the forward's greedy token (native_layer_choice.py, which
also decides at which row counts they run), at most native_linear.MAX_ROWS rows.

A layer with LoRA routes runs here when each route adds into its base output (``Route.adds_into``). Routes
with a native call (``Route.native_lora``: the grouped kernel's, for rows on several adapters or one) are
made inside the same calls, each right after its projection's GEMM: 56 Python calls a step fewer on the
bench model. Routes that add only from Python (one adapter on torch's ops) run between five staged calls.
Any other route, or one on the MLP container, keeps the step's torch ops for that layer.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import torch
from torch import Tensor

from loramux.core.model.linear_kernels import by_rows
from loramux.core.model.native_linear import MAX_ROWS
from loramux.core.native import NativeKernelUnavailable, NativeLora, load_library

log = logging.getLogger(__name__)

Routes = tuple[Any, ...]  # a layer's q, k, v, o, gate, up and down routes (None: unrouted)

SOURCE: Final = Path(__file__).with_name("native") / "decode_layer.c"
TOLERANCE: Final = 1e-4  # of the logits' largest magnitude (at least 1): the probe's bound on the difference
ATTN: Final = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP: Final = ("gate_proj", "up_proj", "down_proj")

_P = ctypes.c_void_p
_I = ctypes.c_int64


class DecodeLayers(enum.Enum):
    """How a lean decode step runs each decoder layer's ops around attention."""

    AUTO = "auto"  # native layers at the row counts where the step timed faster with them here
    NATIVE = "native"  # native layers at every row count they take (native_layers.MAX_ROWS)
    TORCH = "torch"  # the step's torch ops


class NativeLoras:
    """A layer's q, k, v, o, gate, up and down LoRA adds (None: unrouted) as the native calls take them: an
    array of pointers to the routes' ``NativeLora``s (held here while it may be read)."""

    def __init__(self, calls: Sequence[NativeLora | None]) -> None:
        self.calls = tuple(calls)
        self.array = (ctypes.c_void_p * len(calls))(*(ctypes.addressof(c) if c is not None else None for c in calls))


Lora = Routes | NativeLoras | bool | None  # what routes_of gives


class _Layer(ctypes.Structure):
    """decode_layer.c's layer_t: weights (out, in) and biases (NULL: none) of one layer, contiguous fp32."""

    _fields_ = [
        *((name, _P) for name in ("attn_norm", "mlp_norm", "wq", "wk", "wv", "bq", "bk", "bv", "wo", "bo")),
        *((name, _P) for name in ("wg", "wu", "bg", "bu", "wd", "bd")),
        ("attn_eps", ctypes.c_float),
        ("mlp_eps", ctypes.c_float),
        *((name, _I) for name in ("d", "heads", "kv_heads", "head_dim", "inter")),
    ]


def _base(module: Any) -> Any:
    return getattr(module, "_base", module)


def _fp32_cpu(tensor: Tensor | None) -> bool:
    return tensor is None or (tensor.dtype is torch.float32 and tensor.is_cpu and tensor.is_contiguous())


class _LayerTensors:
    """One layer's tensors, its struct for C, and the pointers the struct was built from."""

    def __init__(self, layer: Any, heads: tuple[int, int]) -> None:
        attn, mlp = _base(layer.self_attn), _base(layer.mlp)
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        q, k, v, o = (_base(getattr(attn, name)) for name in ATTN)
        gate, up, down = (_base(getattr(mlp, name)) for name in MLP)
        # in layer_t's order
        self.tensors: list[Tensor | None] = [norms[0].weight, norms[1].weight, q.weight, k.weight, v.weight]
        self.tensors += [q.bias, k.bias, v.bias, o.weight, o.bias, gate.weight, up.weight, gate.bias, up.bias]
        self.tensors += [down.weight, down.bias]
        self.eps = tuple(float(norm.variance_epsilon) for norm in norms)
        self.sizes = (o.out_features, heads[0], heads[1], attn.head_dim, down.in_features)
        self.qkv_sizes = (q.out_features, k.out_features, v.out_features)
        self.pointers: tuple[int, ...] = ()
        self.struct = _Layer()

    def current(self) -> ctypes.Structure:
        """The struct, rebuilt where a tensor's storage moved since it was built (huge_pages.py re-points)."""
        pointers = tuple(t.data_ptr() if t is not None else 0 for t in self.tensors)
        if pointers != self.pointers:
            self.struct = _Layer(*(p or None for p in pointers), *self.eps, *self.sizes)
            self.pointers = pointers
        return self.struct


class NativeDecodeLayers:
    """The native calls of each decoder layer of a Llama-family model (``native_layers`` builds it)."""

    def __init__(self, model: Any, library: ctypes.CDLL) -> None:
        inner = _base(model.model)
        config = model.config
        heads = (config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads))
        self.layers = [_LayerTensors(_base(layer), heads) for layer in inner.layers[: config.num_hidden_layers]]
        # per layer: the MLP container's name (a route on it needs its module), then q, k, v, o, gate, up, down's
        self.names = [
            (
                f"model.layers.{i}.mlp",
                *(f"model.layers.{i}.self_attn.{n}" for n in ATTN),
                *(f"model.layers.{i}.mlp.{n}" for n in MLP),
            )
            for i in range(len(self.layers))
        ]
        self.width = (heads[0] + 2 * heads[1]) * self.layers[0].sizes[3] if self.layers else 0
        self._lib = library
        # (rows, native?) by rows (native_layer_choice.py): a batch of r rows follows the first entry with rows
        # >= r; empty: none
        self.table: tuple[tuple[int, bool], ...] = ()
        self.staged = False  # the probe's: run the staged calls (routed layers') even where no route is
        self._loras: list[NativeLoras | None] = [None] * len(self.layers)  # each layer's last

    def routes_of(self, index: int, rows: int, routes: Mapping[str, Any], x: Tensor) -> Lora:
        """Layer ``index``'s LoRA at ``rows`` rows with input x (N, 1, d): True where it runs here without
        any; a ``NativeLoras`` where its routes' adds run inside the native calls; the q, k, v, o, gate, up
        and down routes (None: unrouted) where it runs here with some that add into their base outputs only
        from Python (staged calls); None where it runs torch's ops."""
        table = self.table
        if not table or rows > MAX_ROWS or not by_rows(table, rows):
            return None
        names = self.names[index]
        if not routes or all(name not in routes for name in names):
            return True if not self.staged else (None,) * len(MLP + ATTN)
        if names[0] in routes:
            return None
        found = tuple(routes.get(name) for name in names[1:])
        if not all(route is None or route.adds_into(x) for route in found):
            return None
        calls = tuple(None if route is None else route.native_lora(rows) for route in found)
        if any(call is None and route is not None for call, route in zip(calls, found, strict=True)):
            return found
        cached = self._loras[index]
        if cached is None or any(a is not b for a, b in zip(cached.calls, calls, strict=True)):
            cached = self._loras[index] = NativeLoras(calls)
        return cached

    def attention_inputs(self, index: int, x: Tensor, cos: Tensor, sin: Tensor, lora: Lora) -> Tensor:
        """x (N, 1, d), cos and sin (N, 1, D) -> (N, 1, (H + 2 Hkv) D): q and k rotated, then v; lora: what
        ``routes_of`` gave (routes add into q, k and v before the rotation)."""
        x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
        rows, layer = x.shape[0], ctypes.byref(self.layers[index].current())
        if cos.numel() != rows * self.layers[index].sizes[3] or sin.shape != cos.shape:  # C reads D per row
            raise ValueError(f"rotary cos/sin {tuple(cos.shape)} do not give each row head_dim values")
        qkv = torch.empty(rows, 1, self.width, dtype=torch.float32)
        threads = torch.get_num_threads()
        if lora is True or isinstance(lora, NativeLoras):
            loras = lora.array if lora is not True else None
            _check(
                self._lib.decode_attn_in(
                    layer, loras, rows, x.data_ptr(), cos.data_ptr(), sin.data_ptr(), qkv.data_ptr(), threads
                )
            )
            return qkv
        assert isinstance(lora, tuple)
        h = torch.empty_like(x)
        self._lib.decode_norm_qkv(layer, rows, x.data_ptr(), h.data_ptr(), qkv.data_ptr(), threads)
        add_into_columns(lora[:3], h, qkv, self.layers[index].qkv_sizes)
        self._lib.decode_rotate(layer, rows, qkv.data_ptr(), cos.data_ptr(), sin.data_ptr())
        return qkv

    def attention_output_and_mlp(self, index: int, x: Tensor, o: Tensor, lora: Lora) -> Tensor:
        """x (N, 1, d) the layer's input, o (N, 1, H D) attention's output -> the layer's output (N, 1, d);
        called after ``attention_inputs`` of the same layer in the same step (it checked the weights' pointers)."""
        x, o = x.contiguous(), o.contiguous()
        # the struct attention_inputs checked this step: nothing moves a storage between a layer's two calls
        rows, layer, threads = x.shape[0], ctypes.byref(self.layers[index].struct), torch.get_num_threads()
        out = torch.empty_like(x)
        if lora is True or isinstance(lora, NativeLoras):
            loras = lora.array if lora is not True else None
            _check(
                self._lib.decode_attn_out_mlp(layer, loras, rows, x.data_ptr(), o.data_ptr(), out.data_ptr(), threads)
            )
            return out
        assert isinstance(lora, tuple)
        inter = self.layers[index].sizes[4]
        mid, h = torch.empty_like(x), torch.empty_like(x)
        self._lib.decode_o(layer, rows, o.data_ptr(), mid.data_ptr(), threads)
        add_into_columns(lora[3:4], o, mid, (mid.shape[-1],))
        gate_up = torch.empty(rows, 1, 2 * inter, dtype=torch.float32)
        self._lib.decode_residual_norm_gate_up(
            layer, rows, x.data_ptr(), mid.data_ptr(), h.data_ptr(), gate_up.data_ptr(), threads
        )
        add_into_columns(lora[4:6], h, gate_up, (inter, inter))
        act = torch.empty(rows, 1, inter, dtype=torch.float32)
        self._lib.decode_silu_down(layer, rows, gate_up.data_ptr(), act.data_ptr(), inter, out.data_ptr(), threads)
        add_into_columns(lora[6:], act, out, (out.shape[-1],))
        return mid + out  # the residual, as x + mlp(h)

    def whole_layer(
        self, index: int, x: Tensor, cos: Tensor, sin: Tensor, lora: Lora, cache: Any, mask: Tensor, scaling: float
    ) -> Tensor:
        """The layer's output (N, 1, d) for x (N, 1, d) in one call, attention included: cache (the layer's
        GrowableLayer) gains this step's column, which C writes; mask (N, S) int64, contiguous, S counting the new
        column; lora: ``routes_of``'s True or NativeLoras (routes adding from Python need the staged calls)."""
        assert lora is True or isinstance(lora, NativeLoras)
        tensors = self.layers[index]
        _, _, kv_heads, dim, _ = tensors.sizes
        rows, length = x.shape[0], cache.get_seq_length() + 1
        x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
        if mask.shape != (rows, length) or mask.dtype is not torch.int64 or not mask.is_contiguous():
            raise ValueError(f"mask {tuple(mask.shape)} {mask.dtype} is not the cache's ({rows}, {length}) int64")
        if cos.numel() != rows * dim or sin.shape != cos.shape:  # C reads D per row
            raise ValueError(f"rotary cos/sin {tuple(cos.shape)} do not give each row head_dim values")
        shape = torch.empty((), dtype=torch.float32).expand(rows, kv_heads, 1, dim)  # what the new column is
        keys, values = cache.extend(shape, shape)  # (N, Hkv, S, D) views of the cache's buffers
        if keys.stride()[2:] != (dim, 1) or values.stride() != keys.stride() or keys.dtype is not torch.float32:
            raise ValueError(f"KV cache views {keys.stride()} {keys.dtype}: not fp32 columns of head_dim")
        out = torch.empty_like(x)
        loras = lora.array if isinstance(lora, NativeLoras) else None
        _check(
            self._lib.decode_layer(
                ctypes.byref(tensors.current()), loras, rows, x.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1), length, mask.data_ptr(),
                scaling, out.data_ptr(), torch.get_num_threads(),
            )
        )  # fmt: skip
        return out


def add_into_columns(routes: Sequence[Any], x: Tensor, out: Tensor, sizes: Sequence[int]) -> None:
    """Each route (None: none) adds its delta for x (N, 1, in) into its columns of out (N, 1, sum sizes): a
    fused GEMM's members' (decode_step.py) or a native call's outputs side by side."""
    flat, start = out.view(out.shape[0], -1), 0
    for size, route in zip(sizes, routes, strict=True):
        if route is not None:
            route.add_into(x, flat[:, start : start + size])
        start += size


def _check(done: int) -> None:
    if done == 1:
        raise MemoryError("the native decode layer's scratch memory")
    if done != 0:
        raise ValueError("the native decode layer: a LoRA add refused its segments")


def unsupported(model: Any) -> list[str]:
    """Why native layers cannot run this model's decode step (every reason), or [] (the probe decides)."""
    reasons = []
    inner = _base(model.model)
    for i, layer in enumerate(inner.layers[: model.config.num_hidden_layers]):
        layer = _base(layer)
        attn, mlp = _base(layer.self_attn), _base(layer.mlp)
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if not all(_fp32_cpu(t) for m in (attn, mlp, *norms) for t in m.parameters()):
            reasons.append(f"layer {i} has weights that are not contiguous fp32 on the CPU")
        if type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLU", "SiLUActivation"):
            reasons.append(f"layer {i}'s MLP activation is not SiLU")
        if float(getattr(model.config, "partial_rotary_factor", 1.0)) != 1.0:
            reasons.append("partial rotary embeddings")
        if not all(hasattr(norm, "variance_epsilon") for norm in norms):
            reasons.append(f"layer {i}'s norms are not RMSNorms with variance_epsilon")
        if reasons:
            break  # the first layer's reasons stand for the others'
    return reasons


@functools.cache
def _library() -> ctypes.CDLL | str:
    """This process's library from the per-user cache, or why it cannot run (built once)."""
    try:
        lib, _ = load_library(SOURCE)
    except NativeKernelUnavailable as exc:
        return str(exc)
    layer, threads = ctypes.POINTER(_Layer), ctypes.c_int
    signatures = {
        "decode_attn_in": [layer, _P, _I, _P, _P, _P, _P, threads],
        "decode_attn_out_mlp": [layer, _P, _I, _P, _P, _P, threads],
        "decode_layer": [layer, _P, _I, _P, _P, _P, _P, _P, _I, _I, _I, _P, ctypes.c_float, _P, threads],
        "decode_norm_qkv": [layer, _I, _P, _P, _P, threads],
        "decode_rotate": [layer, _I, _P, _P, _P],
        "decode_o": [layer, _I, _P, _P, threads],
        "decode_residual_norm_gate_up": [layer, _I, _P, _P, _P, _P, threads],
        "decode_silu_down": [layer, _I, _P, _P, _I, _P, threads],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int, argtypes
    return lib


def native_layers(model: Any) -> NativeDecodeLayers | str:
    """The model's native layers, or why there are none (the step's probe still has to accept them)."""
    reasons = unsupported(model)
    if reasons:
        return "; ".join(reasons)
    library = _library()
    return library if isinstance(library, str) else NativeDecodeLayers(model, library)
