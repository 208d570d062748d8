"""A local cluster: N loramux replicas behind HAProxy on loopback, for users, tests and benchmarks.

    python -m loramux.deploy.cluster --replicas 3 --port 8080 [server flags...]

Each replica is ``loramux-server --load-on-demand`` over one shared adapter root (the flags' --adapter-root;
with the demo model, its adapters folder), on a port of its own, with ``--replica-id replica-N`` and metrics on
a free port; any other flag goes to every replica as given. HAProxy (the system's ``haproxy``) routes by
adapter (deploy/haproxy_config.py). The command prints each replica and the address to connect to once every
replica is SERVING and HAProxy has marked it UP, then runs until SIGTERM or Ctrl-C, and stops everything:
replicas drain first (SIGTERM: NOT_SERVING, --drain-delay, --grace-period), HAProxy last.

Exit status: 0 after a clean stop, 1 if it could not start, 2 for a bad command line, 69 (sysexits'
EX_UNAVAILABLE) when HAProxy is not installed.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from prometheus_client.parser import text_string_to_metric_families

from loramux.demo import ADAPTERS_DIR
from loramux.deploy import haproxy_config as hc
from loramux.deploy.balancer import Balancer
from loramux.deploy.processes import HAPROXY_HINT, Child, ProcessError, find_haproxy, free_port, haproxy_version

EX_UNAVAILABLE = 69
RESERVED_FLAGS = ("--port", "--host", "--replica-id", "--metrics-port")  # the cluster sets them per replica


class HaproxyMissingError(ProcessError):
    def __init__(self, path: str | None) -> None:
        where = f"{path!r} is not an executable" if path else "no `haproxy` on PATH (nor /usr/sbin/haproxy)"
        super().__init__(f"HAProxy is needed for a cluster: {where}; {HAPROXY_HINT}")


@dataclass(frozen=True)
class ClusterSpec:
    replicas: int = 3
    port: int = 0  # HAProxy's; 0: a free one
    host: str = "127.0.0.1"
    server_flags: tuple[str, ...] = ()
    adapter_balance: hc.Balance = "hash"
    hash_balance_factor: int = 125
    timing: hc.Timing = field(default_factory=hc.Timing)
    haproxy: str | None = None  # the binary; None: find_haproxy()
    ready_timeout_s: float = 180.0
    log_dir: Path | None = None  # the children's stderr, one file each; None: this process's stderr
    python: str = sys.executable
    env: tuple[tuple[str, str], ...] = ()  # added to the replicas' environment (e.g. OMP_NUM_THREADS)


class Replica:
    """One ``loramux-server`` child on a fixed port (kept across restarts, so HAProxy's config stays true)."""

    def __init__(self, spec: ClusterSpec, index: int) -> None:
        self.spec, self.index = spec, index
        self.name = f"replica-{index + 1}"
        self.port = free_port(spec.host)
        self.address = f"{spec.host}:{self.port}"
        self.metrics_url = ""
        self.child: Child | None = None
        self._log: IO[str] | None = None

    def start(self) -> None:
        flags = ["--host", self.spec.host, "--port", str(self.port), "--replica-id", self.name, "--metrics-port", "0"]
        argv = [self.spec.python, "-m", "loramux.service", *flags, *_shared_flags(self.spec)]
        if self.spec.log_dir is not None:
            self.close_log()
            self._log = open(self.spec.log_dir / f"{self.name}.log", "a", encoding="utf-8")
        self.child = Child(self.name, argv, log=self._log, env=dict(self.spec.env))

    def wait_ready(self, timeout: float) -> None:
        child = self._started()
        child.wait_for_line(r"^loramux listening on ", timeout=timeout)
        self.metrics_url = child.wait_for_line(r"^loramux metrics on (\S+)", timeout=timeout).group(1)
        child.wait_for_line(r"^loramux ready$", timeout=timeout)

    @property
    def pid(self) -> int:
        return self._started().pid

    def scrape(self) -> dict[str, float]:
        """The replica's /metrics now: each sample by name and labels, e.g.
        ``loramux_requests_total{adapter="upper",rpc="Generate",status="OK"}``."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples

    @property
    def alive(self) -> bool:
        return self.child is not None and self.child.alive

    def kill(self) -> None:
        self._started().send(signal.SIGKILL)

    def terminate(self) -> None:
        self._started().send(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self._started().proc.wait(timeout)

    def stop(self) -> None:
        if self.child is not None:
            t = self.spec
            self.child.stop(timeout=_drain_delay(t.server_flags, t.timing) + _grace(t.server_flags) + 10)
        self.close_log()

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _started(self) -> Child:
        if self.child is None:
            raise ProcessError(f"{self.name} was never started")
        return self.child


class Cluster:
    """``with Cluster(spec) as cluster:`` every replica SERVING and UP in HAProxy; ``cluster.address``."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        binary = find_haproxy(spec.haproxy)
        if binary is None:
            raise HaproxyMissingError(spec.haproxy)
        self.haproxy_binary = binary
        self.version = haproxy_version(binary)
        self._work = tempfile.TemporaryDirectory(prefix="loramux-cluster-")
        self.work_dir = Path(self._work.name)
        self.replicas = [Replica(spec, i) for i in range(spec.replicas)]
        self.balancer = self.balancer_for(self.replicas, port=spec.port, balance=spec.adapter_balance)
        self.address = self.balancer.address

    def balancer_for(
        self,
        replicas: Sequence[Replica],
        *,
        port: int = 0,
        balance: hc.Balance = "hash",
        hash_balance_factor: int | None = None,
        name: str = "haproxy",
    ) -> Balancer:
        """An HAProxy (not started) in front of ``replicas``, on ``port`` (0: a free one); the spec's bounded-load
        factor unless ``hash_balance_factor`` is given."""
        spec = self.spec
        config = hc.HaproxyConfig(
            servers=hc.StaticServers(tuple((r.name, r.address) for r in replicas)),
            bind=f"{spec.host}:{port or free_port(spec.host)}",
            adapter_balance=balance,
            hash_balance_factor=hash_balance_factor or spec.hash_balance_factor,
            timing=spec.timing,
        )
        return Balancer(self.haproxy_binary, config, work_dir=self.work_dir, name=name, log_dir=spec.log_dir)

    def start(self) -> None:
        """Replicas and HAProxy at once (HAProxy marks replicas UP as they become SERVING); bounded waits."""
        self.balancer.start()  # first: it checks its configuration before any replica loads a model
        for replica in self.replicas:
            replica.start()
        deadline = time.monotonic() + self.spec.ready_timeout_s
        for replica in self.replicas:
            replica.wait_ready(max(deadline - time.monotonic(), 0.1))
        self.balancer.wait_up([r.name for r in self.replicas], timeout=max(deadline - time.monotonic(), 0.1))

    def restart(self, index: int) -> Replica:
        """Start replica ``index`` again (same port and id) after it stopped; returns once HAProxy has it UP."""
        replica = self.replicas[index]
        if replica.alive:
            raise ProcessError(f"{replica.name} is still running")
        replica.start()
        replica.wait_ready(self.spec.ready_timeout_s)
        self.balancer.wait_up([replica.name], timeout=self.spec.ready_timeout_s)
        return replica

    def server_states(self) -> dict[str, str]:
        return self.balancer.server_states()

    def wait_states(self, done: Callable[[dict[str, str]], bool], *, timeout: float) -> dict[str, str]:
        return self.balancer.wait_states(done, timeout=timeout)

    def stop(self) -> None:
        """Replicas first (they drain while HAProxy still routes their running streams), then HAProxy."""
        try:
            for replica in self.replicas:
                if replica.alive:
                    replica.terminate()
            for replica in self.replicas:
                replica.stop()
        finally:
            try:
                self.balancer.stop()
            finally:
                self._work.cleanup()

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _flag_value(flags: Sequence[str], name: str) -> str | None:
    for i, flag in enumerate(flags):
        if flag == name and i + 1 < len(flags):
            return flags[i + 1]
        if flag.startswith(name + "="):
            return flag.split("=", 1)[1]
    return None


def _drain_delay(flags: Sequence[str], timing: hc.Timing) -> float:
    given = _flag_value(flags, "--drain-delay")
    return float(given) if given is not None else timing.detection_s


def _grace(flags: Sequence[str]) -> float:
    return float(_flag_value(flags, "--grace-period") or 10.0)


def _shared_flags(spec: ClusterSpec) -> list[str]:
    """The flags every replica gets: load on demand over the shared root, drain delay past HAProxy's detection."""
    flags = ["--load-on-demand", *spec.server_flags]
    if _flag_value(spec.server_flags, "--adapter-root") is None and _flag_value(spec.server_flags, "--model") is None:
        flags += ["--adapter-root", str(ADAPTERS_DIR)]  # the demo model's adapters: every replica has them
    if _flag_value(spec.server_flags, "--drain-delay") is None:
        flags += ["--drain-delay", f"{spec.timing.detection_s:g}"]
    return flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loramux.deploy.cluster",
        description="N loramux replicas behind HAProxy on loopback; other flags go to every replica",
        allow_abbrev=False,  # never mistake a server flag for an abbreviation of ours
    )
    p.add_argument("--replicas", type=int, default=3, help="replicas to start (default 3)")
    p.add_argument("--port", type=int, default=8080, help="HAProxy's port, where clients connect (0: a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address of HAProxy and the replicas (default 127.0.0.1)")
    p.add_argument("--haproxy", help="the HAProxy binary (default: `haproxy` on PATH)")
    p.add_argument("--hash-balance-factor", type=int, default=125, help="bounded loads, percent (default 125)")
    p.add_argument("--log-dir", type=Path, help="write the replicas' and HAProxy's logs there (default: stderr)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, server_flags = parser.parse_known_args(argv)
    reserved = [f for f in server_flags if f.split("=", 1)[0] in RESERVED_FLAGS]
    if reserved or args.replicas < 1 or args.hash_balance_factor <= 100:
        parser.error(f"the cluster sets {', '.join(RESERVED_FLAGS)} itself" if reserved else "bad --replicas or factor")
    spec = ClusterSpec(
        replicas=args.replicas,
        port=args.port,
        host=args.host,
        server_flags=tuple(server_flags),
        hash_balance_factor=args.hash_balance_factor,
        haproxy=args.haproxy,
        log_dir=args.log_dir,
    )
    drain = _drain_delay(spec.server_flags, spec.timing)
    if drain < spec.timing.detection_s:
        print(
            f"loramux cluster: warning: --drain-delay {drain:g} is shorter than the {spec.timing.detection_s:g} s "
            "HAProxy takes to see a replica drain: calls sent to it meanwhile may fail",
            file=sys.stderr,
        )
    try:
        cluster = Cluster(spec)
    except HaproxyMissingError as exc:
        print(f"loramux cluster: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM takes Ctrl-C's way out: the finally below
    try:
        return _run(cluster)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the orderly stop short
        cluster.stop()
        print("loramux cluster stopped", flush=True)


def _run(cluster: Cluster) -> int:
    try:
        cluster.start()
    except ProcessError as exc:
        print(f"loramux cluster: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    for r in cluster.replicas:
        print(f"loramux replica {r.name} on {r.address} (pid {r.pid}, metrics {r.metrics_url})", flush=True)
    n, pid = len(cluster.replicas), cluster.balancer.pid
    print(f"loramux cluster on {cluster.address} (HAProxy {cluster.version}, pid {pid}; {n} replicas)", flush=True)
    stop = threading.Event()
    try:
        while cluster.balancer.alive:
            stop.wait(1.0)  # wakes up to notice a dead HAProxy; signals interrupt it
    except KeyboardInterrupt:
        return 0
    print("loramux cluster: haproxy exited", file=sys.stderr)
    return 1


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
