"""Adapters at platform scale, through the engine: registered vs resident, loads on demand (single flight),
budgets never exceeded and never evicting what runs, loads that never stall the batch, fairness.

Adapters live in a folder of PEFT adapters (one made by PEFT, the others clones with their own seeded random
weights), some under nested names (``tenant-1/a1``). PEFT is the oracle for every output.
"""

from __future__ import annotations

import concurrent.futures
import copy
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramux.core import AdapterManager, Engine, EngineConfig, GenerationRequest, TokenDelta
from loramux.core.adapters import builder
from loramux.core.adapters.adapter import AdapterEvent, AdapterEventKind, AdapterState
from loramux.core.adapters.on_demand import OnDemand
from loramux.core.engine.scheduler import Readiness
from loramux.core.errors import (
    AdapterNotFoundError,
    AdapterSourceForbiddenError,
    CorruptAdapterError,
    InvalidArgumentError,
)
from tests.generation_fixtures import collect

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def farm(adapter_dirs, tmp_path_factory) -> Path:
    """root/tenant-{i}/a{i} for i < 8: PEFT's "math" adapter's config, each with its own random weights."""
    root = tmp_path_factory.mktemp("farm")
    template = adapter_dirs["math"]
    state = load_file(str(template / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(3)
    for i in range(8):
        folder = root / f"tenant-{i}" / f"a{i}"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text((template / "adapter_config.json").read_text())
        tensors = {k: torch.randn(v.shape, generator=generator) * float(v.std()) for k, v in state.items()}
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return root


def name(i: int) -> str:
    return f"tenant-{i}/a{i}"


def peft_greedy(base_model, folder: Path, n: int, prompt: list[int] = PROMPT) -> list[int]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base_model), str(folder)).eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


class Events:
    """The manager's observer: every adapter event, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.all: list[AdapterEvent] = []

    def __call__(self, event: AdapterEvent) -> None:
        with self._lock:
            self.all.append(event)

    def count(self, kind: AdapterEventKind, name: str | None = None) -> int:
        with self._lock:
            return sum(e.kind is kind and (name is None or e.name == name) for e in self.all)


def make(base_model, tokenizer, *, on_demand=None, on_step=None, manager_kw=None, **config):
    events = Events()
    model = copy.deepcopy(base_model)
    manager = AdapterManager(model, on_demand=on_demand, observer=events, **(manager_kw or {}))
    engine = Engine(model, tokenizer, manager, EngineConfig(**config), on_step=on_step)
    return engine, manager, events


def generate(engine: Engine, adapter: str, n: int = 6, prompt: list[int] = PROMPT) -> tuple[list[int], int]:
    ids, _, finished = collect(
        engine.submit(GenerationRequest(prompt=prompt, adapter=adapter, max_new_tokens=n, ignore_eos=True))
    )
    return ids, finished.adapter_version


def test_on_demand_output_equals_peft(base_model, tokenizer, farm):
    engine, manager, events = make(base_model, tokenizer, on_demand=OnDemand(roots=[farm], allow_hub=False))
    try:
        ids, version = generate(engine, name(1))
        assert ids == peft_greedy(base_model, farm / name(1), 6) and version == 1
        info = manager.get_adapter(name(1))
        assert info.on_demand and info.state is AdapterState.RESIDENT and info.requests_served == 1
        assert events.count(AdapterEventKind.LOAD, name(1)) == 1
        assert [e.on_demand for e in events.all if e.kind is AdapterEventKind.LOAD] == [True]
    finally:
        engine.close()


def test_a_hundred_concurrent_requests_share_one_load(base_model, tokenizer, farm):
    engine, manager, events = make(
        base_model, tokenizer, on_demand=OnDemand(roots=[farm], allow_hub=False), max_batch_rows=16
    )
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda _: generate(engine, name(2), 4), range(100)))
        assert events.count(AdapterEventKind.LOAD) == 1  # one load for all of them
        assert {tuple(ids) for ids, _ in results} == {tuple(peft_greedy(base_model, farm / name(2), 4))}
        assert manager.get_adapter(name(2)).requests_served == 100
        assert manager.stats.misses >= 1 and manager.stats.hits + manager.stats.misses == 100
    finally:
        engine.close()


def test_an_evicted_adapter_serves_its_next_request_the_same(base_model, tokenizer, farm):
    engine, manager, events = make(base_model, tokenizer, manager_kw={"max_adapters": 1})
    try:
        for i in (1, 2):
            manager.load_adapter(str(farm / name(i)), f"t{i}")
        assert manager.get_adapter("t1").state is AdapterState.NOT_RESIDENT  # evicted by t2's load
        expected = peft_greedy(base_model, farm / name(1), 6)
        assert generate(engine, "t1") == (expected, 1)
        assert events.count(AdapterEventKind.RELOAD, "t1") == 1 and events.count(AdapterEventKind.EVICT, "t1") == 1
        assert generate(engine, "t2")[0] == peft_greedy(base_model, farm / name(2), 6)  # t1 leaves again
        assert generate(engine, "t1") == (expected, 1)
    finally:
        engine.close()


def test_changed_files_bump_the_version_on_reload(base_model, tokenizer, farm, tmp_path):
    folder = tmp_path / "changing"
    folder.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / f).write_bytes((farm / name(3) / f).read_bytes())
    engine, manager, _ = make(base_model, tokenizer, manager_kw={"max_adapters": 1})
    try:
        manager.load_adapter(str(folder), "x")
        manager.load_adapter(str(farm / name(4)), "other")  # evicts x
        (folder / "adapter_model.safetensors").write_bytes((farm / name(5) / "adapter_model.safetensors").read_bytes())
        os.utime(folder / "adapter_model.safetensors", ns=(1, 1))  # a different mtime whatever the clock says
        assert generate(engine, "x") == (peft_greedy(base_model, farm / name(5), 6), 2)
        assert manager.get_adapter("x").version == 2
    finally:
        engine.close()


def test_a_budget_of_two_with_eight_adapters_in_flight(base_model, tokenizer, farm):
    """Every stream finishes with its solo output, no running adapter is evicted, the budget holds each step."""
    seen: list[tuple[int, int]] = []
    evicted_while_running: set[str] = set()
    engine, manager, events = make(base_model, tokenizer, manager_kw={"max_adapters": 2}, max_batch_rows=8)
    size = 0

    def on_step(_rows: int) -> None:
        resident = {i.name for i in manager.list_adapters(state=AdapterState.RESIDENT)}
        running = {r.adapter.name for r in engine._rows if r.adapter is not None}
        evicted_while_running.update(running - resident)
        seen.append((len(resident), manager.resident_bytes))

    engine._on_step = on_step
    try:
        for i in range(8):
            manager.load_adapter(str(farm / name(i)), f"t{i}")
        size = manager.get_adapter("t0").size_bytes
        channels = [
            engine.submit(GenerationRequest(prompt=PROMPT, adapter=f"t{i}", max_new_tokens=8, ignore_eos=True))
            for i in range(8)
        ]
        results = [collect(c)[0] for c in channels]
    finally:
        engine.close()
    assert results == [peft_greedy(base_model, farm / name(i), 8) for i in range(8)]
    assert seen and all(count <= 2 and held <= 2 * size for count, held in seen), seen
    assert not evicted_while_running  # at every step, every running row's adapter was resident
    assert events.count(AdapterEventKind.RELOAD) >= 6  # the 6 that registering evicted came back for their rows


def test_a_byte_budget_is_never_exceeded(base_model, tokenizer, farm):
    probe = AdapterManager(copy.deepcopy(base_model))
    size = probe.load_adapter(str(farm / name(0)), "probe").info.size_bytes
    held: list[int] = []
    engine, manager, _ = make(
        base_model,
        tokenizer,
        on_demand=OnDemand(roots=[farm], allow_hub=False),
        manager_kw={"max_adapter_bytes": 3 * size + size // 2},
        on_step=lambda _: held.append(manager.resident_bytes),
        max_batch_rows=8,
    )
    try:
        channels = [
            engine.submit(GenerationRequest(prompt=PROMPT, adapter=name(i % 8), max_new_tokens=4, ignore_eos=True))
            for i in range(16)
        ]
        results = [collect(c)[0] for c in channels]
    finally:
        engine.close()
    assert results == [peft_greedy(base_model, farm / name(i % 8), 4) for i in range(16)]
    assert held and max(held) <= 3 * size


def test_unreadable_names_and_escapes_fail_before_anything_is_read(base_model, tokenizer, farm, tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    (root / "evil").symlink_to(farm / name(0), target_is_directory=True)  # a real adapter, outside the root
    (root / "inside").symlink_to(root, target_is_directory=True)
    fetched: list[str] = []
    real_fetch = builder.fetch_adapter_files
    monkeypatch.setattr(
        builder, "fetch_adapter_files", lambda loc, src: fetched.append(loc.model_id) or real_fetch(loc, src)
    )
    engine, manager, _ = make(base_model, tokenizer, on_demand=OnDemand(roots=[root], allow_hub=False))
    try:
        for bad in ("../outside", "/etc/passwd", "a/../../b", "./x", "x//y"):
            with pytest.raises(InvalidArgumentError) as err:
                engine.submit(GenerationRequest(prompt=PROMPT, adapter=bad, max_new_tokens=2))
            assert err.value.field == "adapter"
        with pytest.raises(AdapterSourceForbiddenError):
            generate(engine, "evil")
        with pytest.raises(AdapterNotFoundError) as err:
            generate(engine, "inside/nothing-here")
        assert str(root / "inside" / "nothing-here") in err.value.metadata["searched"]
        assert fetched == []  # nothing was fetched, let alone read
        assert manager.list_adapters() == []
    finally:
        engine.close()


def test_a_corrupt_adapter_on_demand_fails_only_its_own_requests(base_model, tokenizer, farm, tmp_path):
    root = tmp_path / "root"
    (root / "bad").mkdir(parents=True)
    (root / "good").mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (root / "good" / f).write_bytes((farm / name(6) / f).read_bytes())
    (root / "bad" / "adapter_config.json").write_text((farm / name(6) / "adapter_config.json").read_text())
    (root / "bad" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    engine, manager, events = make(
        base_model, tokenizer, on_demand=OnDemand(roots=[tmp_path], allow_hub=False), max_batch_rows=8
    )
    try:
        bad = [engine.submit(GenerationRequest(prompt=PROMPT, adapter="root/bad", max_new_tokens=3)) for _ in range(3)]
        good = engine.submit(GenerationRequest(prompt=PROMPT, adapter="root/good", max_new_tokens=6, ignore_eos=True))
        for channel in bad:
            with pytest.raises(CorruptAdapterError):
                collect(channel)
        assert collect(good)[0] == peft_greedy(base_model, farm / name(6), 6)
        assert [i.name for i in manager.list_adapters()] == ["root/good"]  # nothing registered for the bad one
        assert events.count(AdapterEventKind.LOAD) == 1
    finally:
        engine.close()


def test_a_request_whose_load_failed_stays_dropped_however_often_it_is_asked(base_model, tokenizer, farm, tmp_path):
    """The scheduler may ask a waiting row's readiness twice in one step: the second answer must not turn a
    failed load (its claim spent by the first) into a run on the bare base model (seen once in the soak)."""
    (tmp_path / "root" / "bad").mkdir(parents=True)
    (tmp_path / "root" / "bad" / "adapter_config.json").write_text((farm / name(6) / "adapter_config.json").read_text())
    (tmp_path / "root" / "bad" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    engine, manager, _ = make(base_model, tokenizer, on_demand=OnDemand(roots=[tmp_path], allow_hub=False))
    try:
        row = engine._admission.admit(GenerationRequest(prompt=PROMPT, adapter="root/bad", max_new_tokens=3))
        (claim,) = row.claims
        assert claim.job is not None and claim.job.done.wait(30), "the load did not finish"
        assert [row.readiness(manager) for _ in range(3)] == [Readiness.DROP] * 3
        assert isinstance(row.error, CorruptAdapterError) and row.weights is None
        row.release(manager)
    finally:
        engine.close()


def test_a_burst_on_one_adapter_does_not_hold_up_another(base_model, tokenizer, farm):
    """300 requests queued on A, then one on B: B's first token comes within a few steps, not after A's 300."""
    steps = [0]
    engine, manager, _ = make(
        base_model,
        tokenizer,
        on_step=lambda _: steps.__setitem__(0, steps[0] + 1),
        max_batch_rows=4,
        max_queued=400,
    )
    try:
        manager.load_adapter(str(farm / name(0)), "A")
        manager.load_adapter(str(farm / name(1)), "B")
        burst = [
            engine.submit(GenerationRequest(prompt=PROMPT, adapter="A", max_new_tokens=4, ignore_eos=True))
            for _ in range(300)
        ]
        first_a = next(iter(burst[0]))  # the engine is decoding A's rows
        assert isinstance(first_a, TokenDelta)
        submitted_at = steps[0]
        b = iter(engine.submit(GenerationRequest(prompt=PROMPT, adapter="B", max_new_tokens=4, ignore_eos=True)))
        first_b = next(b)
        waited, a_still_queued = steps[0] - submitted_at, engine.queued
        assert isinstance(first_b, TokenDelta) and waited <= 8, waited
        assert a_still_queued > 250  # B overtook A's backlog
        assert all(len(collect(channel)[0]) == 4 for channel in burst[1:])
        collect(b)
    finally:
        engine.close()


def test_a_load_waiting_for_room_is_not_starved_by_a_burst_on_a_resident_adapter(base_model, tokenizer, farm):
    """Budget 1: a burst on A holds A in use; B (registered, not resident) still gets loaded and served well
    before A's burst is through, because A is drained (its waiting requests let go and wait for A's return)."""
    engine, manager, events = make(base_model, tokenizer, manager_kw={"max_adapters": 1}, max_batch_rows=2)
    try:
        manager.load_adapter(str(farm / name(1)), "B")
        manager.load_adapter(str(farm / name(0)), "A")  # B is evicted
        burst = [
            engine.submit(GenerationRequest(prompt=PROMPT, adapter="A", max_new_tokens=4, ignore_eos=True))
            for _ in range(40)
        ]
        b = engine.submit(GenerationRequest(prompt=PROMPT, adapter="B", max_new_tokens=4, ignore_eos=True))
        ids, _, finished = collect(b)
        a_left = engine.queued
        assert ids == peft_greedy(base_model, farm / name(1), 4) and finished.adapter == "B"
        assert a_left > 20, a_left  # B did not wait for A's burst to finish
        expected_a = peft_greedy(base_model, farm / name(0), 4)
        assert all(collect(channel)[0] == expected_a for channel in burst)
        assert manager.get_adapter("A").version == 1 and events.count(AdapterEventKind.RELOAD, "A") >= 1
    finally:
        engine.close()
