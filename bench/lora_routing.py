"""Per-row LoRA strategies side by side, on one Llama-sized projection (the engine's hot path).

    make bench-routing      # or: python -m bench.lora_routing

Compares, for a batch whose rows use different adapters, the time of one wrapped projection:
- base only (no LoRA) — the floor;
- loop: one matmul pair per distinct adapter over its rows (PEFT's mixed-batch loop);
- gathered: per-row A/B stacks gathered once per batch composition, one bmm pair per step (gather-bmm);
- grouped: rows grouped by adapter into a padded (K, M, in) block, one bmm pair over the K distinct
  adapters' stacks (loramux.core.lora.grouped: each adapter read once);
- wide: all distinct adapters' A concatenated, one wide matmul, rows masked to their own block, then B.
And the prefill's segmented route (one matmul pair per run of rows on one adapter) over a group as
round-robin admission makes it (adapters interleaved) and as the scheduler hands it over (``together``).
The loser strategies live here only, as the measured alternatives to what loramux.core.lora.routing keeps.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from loramux.core.engine.scheduler import together
from loramux.core.lora.grouped import GroupedLinear
from loramux.core.lora.routing import GatheredLinear
from loramux.core.lora.segmented import SegmentedLinear
from loramux.core.lora.weights import LinearLora

Step = Callable[[], torch.Tensor]


def peft_loop(x: torch.Tensor, base: torch.nn.Linear, loras: list[LinearLora], row_slot: list[int]) -> Step:
    """PEFT's _mixed_batch_forward: per distinct adapter, gather its rows, two matmuls, scatter-add."""
    groups = [  # PEFT's layouts: lora_A.weight (r, in), lora_B.weight (out, r), contiguous
        (
            torch.tensor([i for i, s in enumerate(row_slot) if s == u]),
            lo.A.contiguous(),
            (lo.B * lo.scaling).contiguous(),
        )
        for u, lo in enumerate(loras)
    ]

    def step() -> torch.Tensor:
        out = base(x)
        for rows, a, b in groups:
            delta = F.linear(F.linear(x.index_select(0, rows), a), b)
            out = out.index_add(0, rows, delta)
        return out

    return step


def wide_masked(x: torch.Tensor, base: torch.nn.Linear, loras: list[LinearLora], row_slot: list[int]) -> Step:
    r = loras[0].A.shape[0]
    a_cat = torch.cat([lo.A for lo in loras])  # (U*r, in)
    b_cat = torch.cat([lo.B * lo.scaling for lo in loras], dim=1)  # (out, U*r)
    mask = torch.zeros(len(row_slot), 1, len(loras) * r)  # (N, 1, U*r)
    for row, slot in enumerate(row_slot):
        mask[row, :, slot * r : (slot + 1) * r] = 1.0

    def step() -> torch.Tensor:
        return base(x) + F.linear(F.linear(x, a_cat) * mask, b_cat)

    return step


def time_step(step: Step, *, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def projection(*, adapters: int, d_in: int, d_out: int, r: int) -> tuple[torch.nn.Linear, list[LinearLora]]:
    """One base projection and ``adapters`` LoRAs on it (seeded)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(d_in, d_out, bias=False)
    loras = [
        LinearLora.from_peft(torch.randn(r, d_in) * 0.02, torch.randn(d_out, r) * 0.02, None, 2.0)
        for _ in range(adapters)
    ]
    return base, loras


def interleaved_medians(steps: dict[str, Step], *, repeats: int) -> dict[str, float]:
    """Each step's median time over 5 interleaved rounds (the machine is noisy)."""
    with torch.no_grad():
        results: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(5):
            for name, step in steps.items():
                results[name].append(time_step(step, repeats=repeats))
    return {name: statistics.median(v) for name, v in results.items()}


def compare(*, rows: int, tokens: int, adapters: int, d_in: int, d_out: int, r: int, repeats: int) -> dict:
    base, loras = projection(adapters=adapters, d_in=d_in, d_out=d_out, r=r)
    row_slot = [i % adapters for i in range(rows)]
    row_loras = [loras[s] for s in row_slot]
    x = torch.randn(rows, tokens, d_in)
    gathered, grouped = GatheredLinear(row_loras), GroupedLinear(row_loras)
    steps: dict[str, Step] = {
        "base": lambda: base(x),
        "loop": peft_loop(x, base, loras, row_slot),
        "gathered": lambda: gathered.forward(base, x, (), {}),
        "grouped": lambda: grouped.forward(base, x, (), {}),
        "wide": wide_masked(x, base, loras, row_slot),
    }
    reference = steps["loop"]()
    for name in ("gathered", "grouped", "wide"):
        assert torch.allclose(steps[name](), reference, atol=1e-4), name
    return interleaved_medians(steps, repeats=repeats)


def compare_prefill(*, rows: int, tokens: int, adapters: int, d_in: int, d_out: int, r: int) -> dict:
    """Seconds for one projection's prefill: base only, segmented over interleaved rows, segmented grouped."""
    base, loras = projection(adapters=adapters, d_in=d_in, d_out=d_out, r=r)
    slots = [i % adapters for i in range(rows)]  # a0 a1 ... a7 a0 a1 ...: round-robin admission's order
    grouped_slots = together(slots, key=lambda s: s, width=lambda _: tokens)
    x = torch.randn(rows, tokens, d_in)
    interleaved = SegmentedLinear([loras[s] for s in slots])
    grouped = SegmentedLinear([loras[s] for s in grouped_slots])
    steps: dict[str, Step] = {
        "base": lambda: base(x),
        "interleaved": lambda: interleaved.forward(base, x, (), {}),
        "grouped": lambda: grouped.forward(base, x, (), {}),
    }
    return interleaved_medians(steps, repeats=10)


def main() -> None:
    torch.set_num_threads(2)
    names = ("base", "loop", "gathered", "grouped", "wide")
    print(f"{'case':44} " + " ".join(f"{n:>9}" for n in names) + "   (µs per projection)")
    cases = [
        ("decode 8 rows x 8 adapters, 512->512", dict(rows=8, tokens=1, adapters=8, d_in=512, d_out=512)),
        ("decode 8 rows x 8 adapters, 512->1376", dict(rows=8, tokens=1, adapters=8, d_in=512, d_out=1376)),
        (
            "prefill 8x32 tokens x 8 adapters, 512->512",
            dict(rows=8, tokens=32, adapters=8, d_in=512, d_out=512),
        ),
        ("decode 64 rows x 64 adapters, 512->512", dict(rows=64, tokens=1, adapters=64, d_in=512, d_out=512)),
        ("decode 64 rows x 2 adapters, 512->512", dict(rows=64, tokens=1, adapters=2, d_in=512, d_out=512)),
        ("decode 64 rows x 8 adapters, 512->512", dict(rows=64, tokens=1, adapters=8, d_in=512, d_out=512)),
        ("decode 64 rows x 8 adapters, 512->1376", dict(rows=64, tokens=1, adapters=8, d_in=512, d_out=1376)),
        ("decode 64 rows x 1 adapter, 512->512", dict(rows=64, tokens=1, adapters=1, d_in=512, d_out=512)),
        ("decode 8 rows x 2 adapters, 512->512", dict(rows=8, tokens=1, adapters=2, d_in=512, d_out=512)),
    ]
    for label, kwargs in cases:
        t = compare(r=16, repeats=50, **kwargs)
        print(f"{label:44} " + " ".join(f"{t[k] * 1e6:9.1f}" for k in names))
    print("prefill, 64 rows x 32 tokens over 8 adapters, segmented route (ms per projection; LoRA = over base)")
    for d_in, d_out in ((512, 512), (512, 1376), (1376, 512)):
        t = compare_prefill(rows=64, tokens=32, adapters=8, d_in=d_in, d_out=d_out, r=16)
        lora = {k: (t[k] - t["base"]) * 1e3 for k in ("interleaved", "grouped")}
        print(
            f"  {d_in}->{d_out}: base {t['base'] * 1e3:.2f}, LoRA interleaved +{lora['interleaved']:.2f}, "
            f"grouped +{lora['grouped']:.2f} ({lora['interleaved'] / lora['grouped']:.2f}x less LoRA time)"
        )


if __name__ == "__main__":
    main()
