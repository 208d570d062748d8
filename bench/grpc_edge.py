"""The gRPC edge's server-side cost: the same engine called in-process vs behind ``loramux-server``.

    make bench-grpc-edge    # or: python -m bench.grpc_edge   (part of `make bench`)

Workload (issue #13): the bench's Llama-shaped model (hidden 512, 8 layers, fp32) and 8 adapters r=16 on all
seven projections (bench/common.py), saved to a temporary folder once and preloaded by both cases with the
same flags (``--model DIR --adapter a0=DIR ...``, every other flag the server's default); 8 concurrent
requests of 32 prompt token ids on the 8 distinct adapters, 64 new tokens each, greedy, ignore_eos; and one
request alone (adapter a0: a shorter step, but one message a step instead of eight). Two processes live through
every round, each pinned to the first core with one torch thread (``taskset``, OMP_NUM_THREADS=1):

* ``in-process``: a child of this bench that builds its engine with the server's own code (``config_from_args``
  on those flags, then ``build_engine`` on a thread that ends: the same model loading, pinned adapters,
  EngineConfig and warm-up) and submits the requests to it directly, consuming their streams on one event
  loop (as bench/engine.py's ``run_engine``);
* ``gRPC``: ``loramux-server`` on those flags (``--port 0``), driven over Generate streams by the asyncio
  client in this process, pinned to the second core (a remote caller's CPU is not the server's).

They start one after the other (``--linear-kernel auto`` times the GEMMs on the core they share; both choices
are printed, as a different one moves the ratio). After one untimed round, the cases take turns (which goes
first rotates each round) over ROUNDS rounds, each with prompts of its own (the same for both cases: nothing for
the prefix cache to reuse); medians of generated tokens/s, timed from the first submit to the last token (the
goal), and of tokens per CPU second of the serving process, all its threads (/proc schedstat): what the edge
costs the server, unmoved by other processes sharing the core. Also the inter-token latency each consumer sees
(the gaps between its token events, p50/p99/max over every timed round): what a change to the edge costs the
stream while it moves the throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

from bench.common import N_ADAPTERS, bpe_tokenizer, cpu_model, llama_512, make_adapters
from bench.engine import in_fresh_thread

PROMPT_TOKENS, NEW_TOKENS, ROUNDS, GOAL = 32, 64, 12, 0.95
WORKLOADS = {"8 streams on 8 adapters": N_ADAPTERS, "1 stream": 1}
SERVER_FLAGS: dict[str, list[str]] = {"gRPC": []}  # each server case: its flags beyond the shared ones
CASES = ("in-process", *SERVER_FLAGS)
READY_TIMEOUT_S, ROUND_TIMEOUT_S = 300.0, 300.0
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
CELL = re.compile(r"^(\S+ \S+ rows=\d+): .* -> (onednn|torch)$", re.MULTILINE)  # kernel_choice.describe()


def save_model(folder: Path) -> list[str]:
    """The bench model, its tokenizer and the adapters, as the server loads them; the flags naming them."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    with warnings.catch_warnings():  # transformers' FutureWarning about its own code, on saving
        warnings.simplefilter("ignore", FutureWarning)
        base = llama_512()
        base.save_pretrained(folder / "model")
        bpe_tokenizer(8192).save_pretrained(folder / "model")
        paths = make_adapters(base, folder / "adapters")
    return ["--model", str(folder / "model"), *(f"--adapter=a{i}={p}" for i, p in enumerate(paths))]


def batch(streams: int, seed: int) -> dict[str, list]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, 8192) for _ in range(PROMPT_TOKENS)] for _ in range(streams)]
    return {"prompts": prompts, "adapters": [f"a{i % N_ADAPTERS}" for i in range(streams)]}


# -- the in-process case: a child process that owns an engine and runs batches it is sent on stdin ------------


def in_process_child(flags: list[str]) -> None:
    import torch

    from loramux.core import GenerationRequest, TokenDelta
    from loramux.service.__main__ import build_parser, config_from_args
    from loramux.service.runtime import build_engine

    torch.set_num_threads(1)
    config = config_from_args(build_parser().parse_args(flags), {})
    engine = in_fresh_thread(lambda: build_engine(config))  # the server builds it on a thread that ends too

    async def run(prompts: list[list[int]], adapters: list[str]) -> dict[str, Any]:
        start = time.perf_counter()
        channels = [
            engine.submit(GenerationRequest(prompt=tuple(p), adapter=a, max_new_tokens=NEW_TOKENS, ignore_eos=True))
            for p, a in zip(prompts, adapters, strict=True)
        ]
        streams = await asyncio.gather(*(timed_tokens(c, TokenDelta) for c in channels))
        return round_result(streams, time.perf_counter() - start)

    try:
        choice = engine.kernel_choice
        kernels = f"{choice.summary}\n{choice.describe()}" if choice else engine.linear_kernel.value
        print(json.dumps({"kernels": kernels, "threads": torch.get_num_threads()}), flush=True)
        for line in sys.stdin:
            work = json.loads(line)
            print(json.dumps(asyncio.run(run(work["prompts"], work["adapters"]))), flush=True)
    finally:
        engine.close()


class EngineChild:
    """The in-process case's process: one JSON line in per batch, one JSON line out; every wait bounded."""

    def __init__(self, argv: list[str], log: IO[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, **ENV}
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, name="engine-child-stdout", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)  # EOF: the child is gone

    def reply(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                raise RuntimeError(f"the in-process engine did not answer within {timeout:g} s") from None
            if line is None:
                raise RuntimeError(f"the in-process engine exited with status {self.proc.wait(10)}")
            if line.startswith("{"):  # anything else a library printed is not ours
                return json.loads(line)

    def run(self, work: dict[str, list]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(work) + "\n")
        self.proc.stdin.flush()
        return self.reply(ROUND_TIMEOUT_S)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # EOF: the child closes its engine and exits
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# -- the gRPC case ------------------------------------------------------------------------------------------


async def over_grpc(client: Any, work: dict[str, list]) -> dict[str, Any]:
    from loramux.client import TextChunk

    start = time.perf_counter()
    streams = await asyncio.gather(
        *(
            timed_tokens(client.generate_events(p, adapter=a, max_new_tokens=NEW_TOKENS, ignore_eos=True), TextChunk)
            for p, a in zip(work["prompts"], work["adapters"], strict=True)
        )
    )
    return round_result(streams, time.perf_counter() - start)


# -- both cases ---------------------------------------------------------------------------------------------


async def timed_tokens(events: AsyncIterator[Any], kind: type) -> tuple[int, list[float]]:
    """The tokens of one stream's ``kind`` events, and the gaps between those events (ms): inter-token latency
    as this consumer sees it."""
    count, gaps, last = 0, [], None
    async for event in events:
        if isinstance(event, kind):
            now = time.perf_counter()
            count += len(event.token_ids)
            if last is not None:
                gaps.append((now - last) * 1e3)
            last = now
    return count, gaps


def round_result(streams: list[tuple[int, list[float]]], elapsed: float) -> dict[str, Any]:
    counts = [n for n, _ in streams]
    assert counts == [NEW_TOKENS] * len(counts), counts
    return {"tok_s": sum(counts) / elapsed, "gaps_ms": [g for _, gaps in streams for g in gaps]}


Samples = dict[str, dict[str, dict[str, list[float]]]]  # workload -> case -> "tok_s", "tok_cpu_s" -> rounds;
# "gaps_ms" -> every inter-token gap of every timed round


def cpu_seconds(pid: int) -> float:
    """CPU time of every live thread of process ``pid`` (schedstat: nanoseconds on a CPU)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except FileNotFoundError:  # a thread that just ended
            pass
    return total / 1e9


async def measure(servers: dict[str, tuple[str, int]], engine: EngineChild) -> Samples:
    """ROUNDS rounds after an untimed one, the cases taking turns: generated tokens per second, and per CPU
    second of the serving process (all its threads: immune to time-sharing the core with other processes).
    ``servers``: each gRPC case's address and process id."""
    from contextlib import AsyncExitStack

    from loramux.client import AsyncLoramuxClient
    from loramux.service.config import GENERATION_SERVICE

    samples: Samples = {w: {c: {"tok_s": [], "tok_cpu_s": [], "gaps_ms": []} for c in CASES} for w in WORKLOADS}
    async with AsyncExitStack() as stack:  # one channel per server for every round
        clients = {
            case: await stack.enter_async_context(AsyncLoramuxClient(address, timeout=ROUND_TIMEOUT_S))
            for case, (address, _) in servers.items()
        }
        for case, client in clients.items():
            if (status := await client.health(GENERATION_SERVICE)) != "SERVING":
                raise RuntimeError(f"the {case} server says {status}, not SERVING")
        for r in range(ROUNDS + 1):  # round 0 warms all up, untimed
            for w, (workload, streams) in enumerate(WORKLOADS.items()):
                work = batch(streams, seed=100 * r + w)
                for case in CASES[r % len(CASES) :] + CASES[: r % len(CASES)]:  # which goes first rotates
                    pid = servers[case][1] if case in servers else engine.proc.pid
                    cpu = cpu_seconds(pid)
                    if case in clients:
                        result = await over_grpc(clients[case], work)
                    else:
                        result = await asyncio.to_thread(engine.run, work)
                    cpu = cpu_seconds(pid) - cpu
                    if r:
                        samples[workload][case]["tok_s"].append(result["tok_s"])
                        samples[workload][case]["gaps_ms"].extend(result["gaps_ms"])
                        samples[workload][case]["tok_cpu_s"].append(streams * NEW_TOKENS / cpu)
    return samples


def pin_this_process(core: int) -> None:
    """Every thread of this process (and those it starts from now on) on ``core``."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except ProcessLookupError:  # a thread that just ended
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-process", nargs=argparse.REMAINDER, help="run the in-process engine here (internal)")
    args = parser.parse_args()
    if args.in_process is not None:
        in_process_child(args.in_process)
        return
    began = time.perf_counter()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        sys.exit(f"bench.grpc_edge needs two cores (the server's and the client's); this process has {cores}")
    server_core, client_core = cores[0], cores[1]
    import torch

    print(f"== bench.grpc_edge on {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}", flush=True)
    from loramux.deploy.processes import Child

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        flags = in_fresh_thread(lambda: save_model(folder))  # the main thread never runs torch ops
        pin_this_process(client_core)
        pinned = ["taskset", "-c", str(server_core), sys.executable]
        setup_s = time.perf_counter() - began
        servers: dict[str, Child] = {}
        engine: EngineChild | None = None
        logs = {case: folder / f"server {i}.log" for i, case in enumerate(SERVER_FLAGS)}
        with open(folder / "engine.log", "w") as engine_log:
            try:  # one after the other: each times its kernels on the core alone
                engine = EngineChild([*pinned, "-m", "bench.grpc_edge", "--in-process", *flags], engine_log)
                ready = engine.reply(READY_TIMEOUT_S)
                addresses = {}
                for case, case_flags in SERVER_FLAGS.items():
                    argv = [*pinned, "-m", "loramux.service", "--host", "127.0.0.1", "--port", "0", *case_flags]
                    with open(logs[case], "w") as log:  # the child holds its own copy of the descriptor
                        servers[case] = server = Child(case, [*argv, *flags], log=log, env=ENV)
                    line = server.wait_for_line(r"^loramux listening on (\S+)", timeout=READY_TIMEOUT_S)
                    server.wait_for_line(r"^loramux ready$", timeout=READY_TIMEOUT_S)
                    addresses[case] = (line.group(1), server.pid)
                start_s = time.perf_counter() - began - setup_s
                samples = asyncio.run(measure(addresses, engine))
            except BaseException:
                engine_log.flush()
                for log in (folder / "engine.log", *logs.values()):
                    if log.exists():
                        sys.stderr.write(f"-- {log.name} (tail):\n{log.read_text()[-3000:]}\n")
                raise
            finally:
                for server in servers.values():
                    server.stop(timeout=30)
                if engine is not None:
                    engine.close()
        served = re.search(r"linear kernel auto: (.*)\n((?:.*\n)*)", logs["gRPC"].read_text())
        server_kernels = f"{served.group(1)}\n{served.group(2)}" if served else "?"
    print(
        f"engine and server on core {server_core}, one torch thread each (in-process: torch.get_num_threads() = "
        f"{ready['threads']}); the client on core {client_core}; {PROMPT_TOKENS} prompt + {NEW_TOKENS} new tokens"
    )
    report(samples, ready["kernels"], server_kernels)
    total_s = time.perf_counter() - began
    rounds_s = total_s - setup_s - start_s
    print(f"took {total_s:.0f} s: set-up {setup_s:.0f} s, processes' start {start_s:.0f} s, rounds {rounds_s:.0f} s")


def report(samples: Samples, engine_kernels: str, server_kernels: str) -> None:
    ours, theirs = dict(CELL.findall(engine_kernels)), dict(CELL.findall(server_kernels))
    differ = [cell for cell in ours if theirs.get(cell) != ours[cell]]
    print(
        f"== linear kernels, --linear-kernel auto: in-process {engine_kernels.splitlines()[0]}, "
        f"server {server_kernels.splitlines()[0]}; "
        + (f"{len(differ)} cells differ: {', '.join(differ)}" if differ else "the same in every cell")
    )
    print(f"== generated tokens/s, and per CPU second of the serving process (median of {ROUNDS} interleaved rounds)")
    for workload, by_case in samples.items():
        for case, m in by_case.items():
            tok_s, tok_cpu_s = statistics.median(m["tok_s"]), statistics.median(m["tok_cpu_s"])
            print(f"{case + ', ' + workload:40} {tok_s:8.1f} tok/s {tok_cpu_s:8.1f} tok/CPU-s")
    print("== ratios, gRPC edge vs in-process")
    for workload, by_case in samples.items():
        local = by_case["in-process"]
        for case in SERVER_FLAGS:
            ratio = statistics.median(by_case[case]["tok_s"]) / statistics.median(local["tok_s"])
            cpu_ratio = statistics.median(by_case[case]["tok_cpu_s"]) / statistics.median(local["tok_cpu_s"])
            goal = f"(goal >= {GOAL}x) {'ok' if ratio >= GOAL else 'MISSED'}" if case == "gRPC" else "(no goal)"
            print(f"{'tokens/s, ' + case + ', ' + workload:70} {ratio:6.2f}x  {goal}")
            print(f"{'tokens per server CPU second, ' + case + ', ' + workload:70} {cpu_ratio:6.2f}x  (no goal)")
            for key in ("tok_s", "tok_cpu_s"):
                pairs = zip(by_case[case][key], local[key], strict=True)
                print(
                    f"  rounds, {'tokens/s' if key == 'tok_s' else 'per CPU second'}: "
                    + ", ".join(f"{g / i:.2f}" for g, i in pairs)
                )
    print("== inter-token latency as the consumer sees it, ms (every gap of every timed round)")
    for workload, by_case in samples.items():
        for case, m in by_case.items():
            p50, p99 = percentile(m["gaps_ms"], 0.50), percentile(m["gaps_ms"], 0.99)
            print(f"{case + ', ' + workload:54} p50 {p50:6.2f}  p99 {p99:6.2f}  max {max(m['gaps_ms']):7.2f}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


if __name__ == "__main__":
    main()
