"""Which GEMM runs the model's linear layers when the engine decodes on CPU.

PyTorch's CPU build sends an fp32 ``F.linear`` to MKL's sgemm. At the shapes of serving (a few to a few dozen
rows against a wide weight) oneDNN's JIT kernels, which the same build ships and already uses for bf16, run
the same product 1.4-3.4x faster on this project's AMD machine (MKL takes a generic path on AMD CPUs), and a
whole decode step 1.5-1.7x faster (BENCHMARKS.md). Results agree with MKL's to fp32 rounding: both accumulate
in fp32, in a different order.

Each ``OneDnnLinear`` keeps its weight reordered once into oneDNN's blocked layout (``_reorder_linear_weight``):
a plain weight is reordered on every call, which at decode shapes costs as much as the product itself (a model's
linears stream 38 GB/s packed against 21 GB/s plain here). The packed copy costs one more copy of the linear
weights' memory (so it is skipped, logged, when the copies would take more than half the memory this
machine has available: a large model keeps oneDNN on its plain weights rather than running out); it is
rebuilt when the weight changes (another tensor, or an in-place write such as
``load_state_dict`` or ``copy_`` under ``no_grad``), and it is never pickled, deep-copied or saved. A write
through ``weight.data`` bypasses the version counter and is not seen: it would leave the packed copy stale.

``use_linear_kernel(model, LinearKernel.ONEDNN)`` turns each plain ``nn.Linear`` into a ``OneDnnLinear``: the
same object, parameters and state_dict, only its class changes, so nothing that holds or indexes the module
is disturbed.
A ``OneDnnLinear`` is exactly ``nn.Linear`` whenever autograd is on (training through ``is_trainable``), or the
input is not a CPU fp32/bf16 tensor of at least two dimensions.
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Sequence
from typing import Final, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loramux.core.model.native_linear import MAX_ROWS, NativeLinear, native_linear
from loramux.core.native import NativeKernelUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

FUSED: Final = "_loramux_fused"  # a member layer's __dict__ key of its fused_linears.FusedSiblings


class LinearKernel(enum.Enum):
    """The GEMM behind the model's nn.Linear layers on CPU."""

    AUTO = "auto"  # each layer, at each row count, on whichever kernel was fastest here (kernel_choice.py)
    ONEDNN = "onednn"  # oneDNN's JIT kernels, weights packed once (OneDnnLinear)
    TORCH = "torch"  # torch's default: MKL's sgemm on x86, what transformers and PEFT run
    NATIVE = "native"  # loramux's skinny fp32 kernel up to native_linear.MAX_ROWS rows, torch's beyond


_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)  # what oneDNN may run; onednn_dtypes(): what it runs here
_PROBE_TOLERANCE: Final = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# oneDNN picks the packed layout for about this many rows; 8 and 64 measured the same at every batch size
_PACK_ROWS_HINT: Final = 32
_PACKED: Final = "_onednn_packed"  # the __dict__ key of (weight key, packed weight)
# --linear-kernel native: the native kernel where it takes the rows, torch's GEMM beyond
NATIVE_ROWS: Final = ((MAX_ROWS, LinearKernel.NATIVE), (MAX_ROWS + 1, LinearKernel.TORCH))


def by_rows(table: Sequence[tuple[int, T]], rows: int) -> T:
    """The value of a by-rows table (measured rows ascending) for a call of ``rows``: the first entry with
    rows >= ``rows``, the last beyond."""
    for measured, value in table:
        if rows <= measured:
            return value
    return table[-1][1]


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # (..., in) @ (out, in).T + (out,) -> (..., out); weight plain or packed; "none": no fused post-op
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _pack(weight: Tensor) -> Tensor:
    """weight (out, in) reordered into oneDNN's blocked layout: an opaque tensor only oneDNN ops can read."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_ROWS_HINT)


class OneDnnLinear(nn.Linear):
    """nn.Linear whose inference forward on CPU runs oneDNN's GEMM (see the module docstring)."""

    packs = True  # keep a packed copy of the weight; set False on an instance to run on the plain weight
    # (rows, kernel) by rows (--linear-kernel auto: measured here); a call of r rows follows the first entry
    # with rows >= r (the last beyond). None: oneDNN at every row count
    kernel_rows: tuple[tuple[int, LinearKernel], ...] | None = None
    native: NativeLinear | None = None  # the loaded native kernel, where the table names it

    def forward(self, input: Tensor) -> Tensor:
        group = self.__dict__.get(FUSED)  # a member of sibling layers run as one GEMM (fused_linears.py)
        if group is not None:
            out = group.output_of(self, input)
            if out is not None:
                return out
        weight = self.weight
        if torch.is_grad_enabled() or input.numel() == 0:
            return F.linear(input, weight, self.bias)
        kernel = self.kernel_at(input.numel() // input.shape[-1])
        if (
            kernel is LinearKernel.ONEDNN
            and input.device.type == "cpu"
            and input.dtype == weight.dtype
            and input.dtype in onednn_dtypes()
            and input.dim() >= 2
        ):
            return _onednn_linear(input, self._packed_weight(weight) if self.packs else weight, self.bias)
        if kernel is LinearKernel.NATIVE and self.native is not None and self.native.takes(input, weight):
            return self.native(input, weight, self.bias)
        return F.linear(input, weight, self.bias)

    def kernel_at(self, rows: int) -> LinearKernel:
        """The kernel a call of ``rows`` rows runs on (where it can: else torch's)."""
        table = self.kernel_rows
        return LinearKernel.ONEDNN if table is None else by_rows(table, rows)

    def drop_packed(self) -> None:
        """This layer never runs oneDNN (auto found another kernel faster at every row count): no packed copy."""
        self.__dict__.pop(_PACKED, None)
        self.packs = False

    def prepack(self) -> None:
        """Pack now (at startup) rather than in the first request's forward, when the weight is one oneDNN runs."""
        weight = self.weight
        if weight.device.type == "cpu" and weight.dtype in onednn_dtypes():
            with torch.no_grad():
                self._packed_weight(weight)

    def _packed_weight(self, weight: Tensor) -> Tensor:
        key = (weight.data_ptr(), weight._version, weight.dtype)  # _version: bumped by every in-place write
        cached = self.__dict__.get(_PACKED)
        if cached is None or cached[0] != key:
            cached = self.__dict__[_PACKED] = (key, _pack(weight))
        return cached[1]

    def __getstate__(self) -> dict:
        # copies and pickles leave the packed weight behind (opaque tensors can be neither), rebuilt on use
        state = dict(self.__dict__)
        state.pop(_PACKED, None)
        if state.pop(FUSED, None) is not None:  # a copy is a layer of its own: unfused, its weight not a view
            state["_parameters"] = {
                k: nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) if p is not None else None
                for k, p in self._parameters.items()
            }
        return state


def onednn_works() -> bool:
    """Whether this torch build has oneDNN's linear and it computes what F.linear computes, in fp32."""
    return torch.float32 in onednn_dtypes()


@functools.cache
def onednn_dtypes() -> frozenset[torch.dtype]:
    """The dtypes whose linear oneDNN runs on this CPU (plain and packed weight) as F.linear computes it; probed
    once. bf16 needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT: an AVX2-only CPU runs bf16 layers on F.linear."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return frozenset()
    return frozenset(dtype for dtype in _ONEDNN_DTYPES if _probe(dtype))


def _probe(dtype: torch.dtype) -> bool:
    generator = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(shape, generator=generator).to(dtype) for shape in ((3, 8), (5, 8), (5,)))
    try:
        with torch.no_grad():
            got = [_onednn_linear(x, weight, b) for weight in (w, _pack(w))]
    except Exception:  # any failure of a private op (this CPU lacks its instructions, say) means: do not use it
        return False
    want, tolerance = F.linear(x, w, b).float(), _PROBE_TOLERANCE[dtype]
    return all(g.shape == (3, 5) and torch.allclose(g.float(), want, rtol=tolerance, atol=tolerance) for g in got)


def use_linear_kernel(model: nn.Module, kernel: LinearKernel) -> LinearKernel:
    """Run the model's plain nn.Linear layers with ``kernel``; returns the kernel in use, TORCH when oneDNN is
    asked for but this build lacks it (logged). NATIVE where the native kernel cannot run raises
    NativeKernelUnavailable (why). Subclasses of nn.Linear are left alone."""
    if not isinstance(kernel, LinearKernel):
        raise TypeError(f"kernel must be a LinearKernel (got {kernel!r})")
    if kernel is LinearKernel.AUTO:
        raise ValueError("LinearKernel.AUTO is measured and applied by kernel_choice.start_linear_kernels")
    if kernel is LinearKernel.ONEDNN and not onednn_works():
        log.warning("oneDNN linear is not available in this torch build; using torch's default GEMM")
        kernel = LinearKernel.TORCH
    native = native_linear() if kernel is LinearKernel.NATIVE else None
    if isinstance(native, str):
        raise NativeKernelUnavailable(f"--linear-kernel native: {native}")
    switched = plain_linears(model)
    for module in switched:  # every one starts afresh: no packed copy, nor what an earlier auto chose
        for key in (_PACKED, "packs", "kernel_rows", "native", FUSED):  # fused again, if at all, by kernel_choice
            module.__dict__.pop(key, None)
    packs = kernel is LinearKernel.ONEDNN and _packed_copies_fit(switched)
    for module in switched:
        module.__class__ = nn.Linear if kernel is LinearKernel.TORCH else OneDnnLinear
        if isinstance(module, OneDnnLinear):
            module.packs = packs
            if packs:
                module.prepack()
            if native is not None:
                module.kernel_rows, module.native = NATIVE_ROWS, native
    return kernel


def plain_linears(model: nn.Module) -> list[nn.Linear]:
    """The model's plain nn.Linear layers, those this module switched to OneDnnLinear included (subclasses of
    nn.Linear are someone else's: left alone)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and type(m) in (nn.Linear, OneDnnLinear)]


def _packed_copies_fit(modules: Sequence[nn.Module]) -> bool:
    """Whether packed copies of these modules' CPU weights take at most half the memory available now."""
    # one packed copy per module, even where modules share a weight
    weights = [m.weight for m in modules if isinstance(m.weight, Tensor) and m.weight.device.type == "cpu"]
    needed = sum(w.numel() * w.element_size() for w in weights)
    available = available_memory_bytes()
    if available is None or needed <= available // 2:
        return True
    log.warning(
        "not packing linear weights for oneDNN: %.1f GB of copies against %.1f GB of available memory; "
        "oneDNN runs on the plain weights",
        needed / 1e9,
        available / 1e9,
    )
    return False


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the value is in kB
    except (OSError, ValueError, IndexError):
        return None
    return None
