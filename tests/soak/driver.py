"""The soak: minutes of mixed traffic against a real `loramux-server` process, then the checks.

Traffic, from WORKERS client threads each drawing actions from its own seeded generator: streams on many
adapters (registered, and loaded on demand from an adapter root with a budget smaller than the pool, so
adapters are evicted and reloaded all the time), cancels mid-stream, deadlines that expire mid-stream,
oversize prompts, unknown and corrupt adapters, and LoadAdapter/UnloadAdapter churn. Checks at the end:

* every call ended exactly once, with a status its action allows (an OK stream ends with exactly one
  ``finished`` event, last; a failed one has none);
* health stayed SERVING throughout (a Watch stream kept open from start to end);
* the server's RSS after the run is within RSS_GROWTH of its RSS after the warm-up (no leak);
* /metrics counts of Generate calls by status equal what the clients saw, but for one gap the server cannot
  close: a call whose deadline passes before grpc hands it to the servicer (a busy loop, a 1 MB prompt ahead of
  it on the connection) never runs a handler, so it is counted only by the client. Such a call streamed
  nothing; the server's DEADLINE_EXCEEDED count may be short of the clients' by at most the number of those.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from loramux.v1 import adapter_service_pb2 as apb
from loramux.v1 import adapter_service_pb2_grpc as apb_grpc
from loramux.v1 import generation_service_pb2 as gpb
from loramux.v1 import generation_service_pb2_grpc as gpb_grpc

WORKERS = 8
POOL = 12  # adapters on disk for load on demand; the budget holds BUDGET of them
BUDGET = 4
RSS_GROWTH = 0.05  # allowed, relative, plus RSS_SLACK
RSS_SLACK = 16 << 20
GRACE_S = 2.0  # for the server's counts to catch up once they agree within the silent deadlines
PREFIX_CACHE = 16 << 20  # the server's --prefix-cache-memory: it may fill after the warm-up, by design
LONG = 100_000 // 64  # new tokens a cancelled or expiring stream asks for, at most (within the context)
ALLOWED = {  # action -> statuses it may end with
    "stream": {"OK"},
    "cancel": {"CANCELLED"},
    "deadline": {"DEADLINE_EXCEEDED"},
    "oversize": {"RESOURCE_EXHAUSTED"},
    "unknown": {"NOT_FOUND"},
    "corrupt": {"FAILED_PRECONDITION"},
    "churn": {"OK"},
}
ACTIONS = [
    ("stream", 10),
    ("cancel", 2),
    ("deadline", 2),
    ("oversize", 1),
    ("unknown", 1),
    ("corrupt", 1),
    ("churn", 1),
]


@dataclass
class Report:
    seconds: float
    calls: Counter = field(default_factory=Counter)  # (action, status) -> count
    generate_statuses: Counter = field(default_factory=Counter)  # what clients saw of Generate
    silent_deadlines: int = 0  # of those, DEADLINE_EXCEEDED with no response: perhaps never seen by a handler
    server_generate_statuses: dict[str, float] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    health: list[str] = field(default_factory=list)
    rss_after_warm_up: int = 0
    rss_after_run: int = 0
    tokens: int = 0

    @property
    def rss_growth(self) -> float:
        return self.rss_after_run / self.rss_after_warm_up - 1

    def problems(self) -> list[str]:
        found = list(self.unexpected)
        if self.health != ["SERVING"]:
            found.append(f"health was not SERVING throughout: {self.health}")
        if self.rss_after_run > self.rss_after_warm_up * (1 + RSS_GROWTH) + RSS_SLACK + PREFIX_CACHE:
            found.append(f"RSS grew {self.rss_growth:+.1%} ({self.rss_after_warm_up} -> {self.rss_after_run} bytes)")
        if not counts_agree(self.server_generate_statuses, self.generate_statuses, self.silent_deadlines):
            found.append(
                f"/metrics Generate statuses {self.server_generate_statuses} != clients' "
                f"{dict(self.generate_statuses)} (of which {self.silent_deadlines} silent deadlines)"
            )
        return found

    def summary(self) -> str:
        calls = sum(self.calls.values())
        lines = [
            f"soak: {self.seconds:.0f} s, {calls} calls ({calls / self.seconds:.1f}/s), {self.tokens} tokens streamed",
            "  by action and status: " + ", ".join(f"{a}/{s} {n}" for (a, s), n in sorted(self.calls.items())),
            f"  health throughout: {' -> '.join(self.health)}",
            f"  server RSS after warm-up {self.rss_after_warm_up / 2**20:.1f} MiB, after the run "
            f"{self.rss_after_run / 2**20:.1f} MiB ({self.rss_growth:+.1%}; allowed {RSS_GROWTH:.0%} + 16 MiB + the "
            f"prefix cache's {PREFIX_CACHE >> 20} MiB)",
            f"  /metrics Generate statuses {dict(sorted(self.server_generate_statuses.items()))} vs clients "
            f"{dict(sorted(self.generate_statuses.items()))} ({self.silent_deadlines} deadlines streamed nothing)",
            "  problems: " + ("; ".join(self.problems()) or "none"),
        ]
        return "\n".join(lines)


def adapter_root(template: Path, folder: Path) -> Path:
    """POOL copies of a PEFT adapter folder (tenant-i/adapter), and a corrupt one (tenant-bad/adapter)."""
    for i in range(POOL):
        shutil.copytree(template, folder / f"tenant-{i}" / "adapter")
    bad = folder / "tenant-bad" / "adapter"
    bad.mkdir(parents=True)
    shutil.copy(template / "adapter_config.json", bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 128)
    return folder


class Server:
    def __init__(self, model: Path, root: Path, template: Path, cwd: Path) -> None:
        cmd = [
            str(Path(sys.executable).parent / "loramux-server"),
            *("--model", str(model), "--port", "0", "--metrics-port", "0", "--no-warm-up"),
            *("--load-on-demand", "--adapter-root", str(root), "--no-hub-adapters"),
            *("--max-adapters", str(BUDGET), "--max-batch-rows", "8", "--max-prompt-tokens", "256"),
            *("--adapter", f"pinned={template}", "--grace-period", "5", "--log-level", "WARNING"),
            *("--prefix-cache-memory", str(PREFIX_CACHE)),
        ]
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            lines = [pool.submit(self.proc.stdout.readline).result(300) for _ in range(3)]
        listening, metrics, ready = lines
        assert listening.startswith("loramux listening on"), lines
        assert ready.strip() == "loramux ready", lines
        self.target = listening.strip().rsplit(" ", 1)[1]
        self.metrics_url = metrics.strip().rsplit(" ", 1)[1]

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def metrics(self) -> dict[tuple[str, tuple], float]:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


class Traffic:
    def __init__(self, server: Server, root: Path, report: Report, *, long: int) -> None:
        self.channel = grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 8 << 20)])
        self.gen = gpb_grpc.GenerationServiceStub(self.channel)
        self.adapters = apb_grpc.AdapterServiceStub(self.channel)
        self.root, self.report, self.long = root, report, long
        self._lock = threading.Lock()

    def run(self, seconds: float, *, seed: int) -> None:
        deadline = time.monotonic() + seconds
        with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
            for f in [pool.submit(self._worker, deadline, seed * 100 + w) for w in range(WORKERS)]:
                f.result()

    def _worker(self, deadline: float, seed: int) -> None:
        rng = random.Random(seed)
        names, weights = zip(*ACTIONS, strict=True)
        while time.monotonic() < deadline:
            action = rng.choices(names, weights=weights)[0]
            status, tokens, responses = getattr(self, "_" + action)(rng, seed)
            with self._lock:
                self.report.calls[(action, status)] += 1
                self.report.tokens += tokens
                if action != "churn":
                    self.report.generate_statuses[status] += 1
                    self.report.silent_deadlines += int(status == "DEADLINE_EXCEEDED" and not responses)
                if status not in ALLOWED[action]:
                    self.report.unexpected.append(f"{action} ended with {status}")

    def _generate(
        self, adapter: str, n: int, *, text: str = "Prove that", timeout: float = 60, read: int | None = None
    ):
        request = gpb.GenerateRequest(
            text=text, adapter=adapter, stopping=gpb.StoppingCriteria(max_new_tokens=n, ignore_eos=True)
        )
        call = self.gen.Generate(request, timeout=timeout)
        responses = []
        try:
            for response in call:
                responses.append(response)
                if read is not None and len(responses) >= read:
                    call.cancel()
        except grpc.RpcError as exc:
            if any(r.HasField("finished") for r in responses):
                return "FINISHED BEFORE AN ERROR", 0, len(responses)
            return exc.code().name, 0, len(responses)
        finished = [i for i, r in enumerate(responses) if r.HasField("finished")]
        if finished != [len(responses) - 1]:
            return "OK WITHOUT EXACTLY ONE FINISHED, LAST", 0, len(responses)
        return "OK", sum(len(r.chunk.token_ids) for r in responses if r.HasField("chunk")), len(responses)

    def _pick(self, rng: random.Random) -> str:
        return "pinned" if rng.random() < 0.2 else f"tenant-{rng.randrange(POOL)}/adapter"

    def _stream(self, rng, seed):
        return self._generate(self._pick(rng), rng.randint(4, 32))

    def _cancel(self, rng, seed):
        return self._generate(self._pick(rng), self.long, read=rng.randint(1, 3))

    def _deadline(self, rng, seed):
        return self._generate(self._pick(rng), self.long, timeout=0.3)

    def _oversize(self, rng, seed):
        return self._generate("pinned", 8, text="word " * 200_000)

    def _unknown(self, rng, seed):
        return self._generate(f"tenant-missing-{rng.randrange(1000)}/adapter", 4)

    def _corrupt(self, rng, seed):
        return self._generate("tenant-bad/adapter", 4)

    def _churn(self, rng, seed):
        name, source = f"churn-{seed}", self.root / f"tenant-{rng.randrange(POOL)}" / "adapter"
        try:
            self.adapters.LoadAdapter(apb.LoadAdapterRequest(name=name, source=str(source)), timeout=60)
            self.adapters.UnloadAdapter(apb.UnloadAdapterRequest(name=name), timeout=60)
        except grpc.RpcError as exc:
            return exc.code().name, 0, 0
        return "OK", 0, 0


def watch_health(target: str, report: Report, stop: threading.Event) -> threading.Thread:
    def watch() -> None:
        channel = grpc.insecure_channel(target)
        call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="loramux.v1.GenerationService")
        )
        threading.Thread(target=lambda: (stop.wait(), call.cancel()), daemon=True).start()
        try:
            for response in call:
                report.health.append(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
        except grpc.RpcError:
            pass
        channel.close()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def soak(*, model: Path, template: Path, workdir: Path, seconds: float) -> Report:
    """Run the soak (a tenth of ``seconds``, at least 5 s, of warm-up first) and return its report."""
    root = adapter_root(template, workdir / "root")
    server = Server(model, root, template, workdir)
    report = Report(seconds=seconds)
    stop = threading.Event()
    try:
        watcher = watch_health(server.target, report, stop)
        traffic = Traffic(server, root, report, long=long_stream_tokens(model))
        traffic.run(max(5.0, seconds / 10), seed=1)  # warm-up: every adapter loaded and evicted, pools grown
        baseline = settled(server, clients=report.generate_statuses, silent=report.silent_deadlines, before={})
        report.calls.clear()
        report.generate_statuses.clear()
        report.silent_deadlines = 0
        report.tokens = 0
        report.rss_after_warm_up = server.rss()
        traffic.run(seconds, seed=2)
        counted = settled(server, clients=report.generate_statuses, silent=report.silent_deadlines, before=baseline)
        report.server_generate_statuses = counted
        report.rss_after_run = server.rss()
        stop.set()
        watcher.join(10)
        traffic.channel.close()
    finally:
        stop.set()
        server.stop()
    return report


def long_stream_tokens(model: Path) -> int:
    """LONG, or fewer when the model's context is shorter (the bench's model has 512 positions): a request past
    the context is refused at admission (RESOURCE_EXHAUSTED), and these must be running when they end."""
    config = json.loads((model / "config.json").read_text())
    positions = config.get("max_position_embeddings") or config.get("n_positions") or LONG + 64
    return min(LONG, positions - 64)  # room for the prompt


def generate_counts(metrics: dict[tuple[str, tuple], float]) -> dict[str, float]:
    counts: dict[str, float] = {}
    for (name, labels), value in metrics.items():
        if name == "loramux_requests_total" and ("rpc", "Generate") in labels:
            status = dict(labels)["status"]
            counts[status] = counts.get(status, 0.0) + value
    return counts


def counts_agree(server: dict[str, float], clients: Counter, silent: int) -> bool:
    """Every status counted alike on both sides, but DEADLINE_EXCEEDED, which the server may have counted up to
    ``silent`` fewer times (see the module's docstring)."""
    statuses = {k for k, v in server.items() if v} | set(clients)
    short = {k: clients.get(k, 0) - server.get(k, 0.0) for k in statuses}
    return all(v == 0 for k, v in short.items() if k != "DEADLINE_EXCEEDED") and (
        0 <= short.get("DEADLINE_EXCEEDED", 0) <= silent
    )


def settled(server: Server, *, clients: Counter, silent: int, before: dict[str, float]) -> dict[str, float]:
    """The server's Generate counts by status since ``before``, once it is idle and they agree with the clients'
    (a handler records its call just after the client got its status: wait for it, bounded). Counts that agree
    only within the silent deadlines get a grace of GRACE_S to become exact (a record landing late)."""
    tick, deadline = threading.Event(), time.monotonic() + 60
    agreed_at: float | None = None
    while True:
        m = server.metrics()
        counts = {k: v - before.get(k, 0.0) for k, v in generate_counts(m).items()}
        idle = (
            m.get(("loramux_num_requests_running", ()), 1) == 0 and m.get(("loramux_num_requests_waiting", ()), 1) == 0
        )
        if idle and counts_agree(counts, clients, 0):
            return counts
        if idle and counts_agree(counts, clients, silent):
            agreed_at = agreed_at or time.monotonic()
            if time.monotonic() - agreed_at > GRACE_S:
                return counts
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the server did not settle within 60 s: idle={idle}, counted {counts}, clients saw {dict(clients)} "
                f"({silent} deadlines that streamed nothing)"
            )
        tick.wait(0.05)
