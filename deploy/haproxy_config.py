"""The HAProxy configuration in front of loramux replicas, rendered from a few choices (one source for all).

``python -m loramux.deploy.haproxy_config`` prints the example of deploy/haproxy/haproxy.cfg (three replicas on
loopback), ``--kubernetes`` the one in deploy/kubernetes/haproxy.yaml (replicas found through DNS); the local
cluster (deploy/cluster.py) and the benchmark render their own. tests/deploy checks that the committed files
are what this renders and that HAProxy accepts them (``haproxy -c``).

What the configuration does, and why, is written into it as comments: adapter affinity with bounded loads for
calls that carry x-loramux-adapter, least-connections for the rest, a real gRPC readiness check
(deploy/grpc_probe.py), timeouts derived from the server's limits, retries of refused connections on another
replica, and nothing that cuts running streams when a replica drains.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from loramux.core import EngineConfig
from loramux.deploy import grpc_probe
from loramux.service.config import GENERATION_SERVICE
from loramux.service.routing import ADAPTER_KEY

TESTED_ON = "HAProxy 2.6.12 (Debian 12's haproxy package)"
Balance = Literal["hash", "roundrobin"]


@dataclass(frozen=True)
class StaticServers:
    """Replicas at fixed addresses: (name, host:port) pairs."""

    servers: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class DnsServers:
    """Replicas found through DNS: every address ``fqdn`` resolves to (a Kubernetes headless Service), in up to
    ``slots`` server slots."""

    fqdn: str
    port: int
    slots: int = 16
    prefix: str = "replica"


@dataclass(frozen=True)
class Timing:
    """Health-check cadence, and what bounds the timeouts."""

    check_interval_ms: int = 500
    fall: int = 2  # failed checks in a row before a replica is DOWN
    rise: int = 2  # passed checks in a row before it is UP again
    check_timeout_ms: int = 1000
    connect_timeout_ms: int = 1000
    decode_step_s: float = 0.03  # what one decode step is assumed to take, for the silence bound (CPU, large batch)
    engine: EngineConfig = field(default_factory=EngineConfig)  # the replicas' limits (defaults: the server's)

    @property
    def detection_s(self) -> float:
        """Longest time from a replica turning NOT_SERVING to HAProxy marking it DOWN."""
        return (self.fall * self.check_interval_ms + self.check_timeout_ms) / 1000

    @property
    def silence_s(self) -> float:
        """Longest a Generate may stay silent: queued behind max_queued / max_batch_rows batches of
        generations of max_new_tokens_ceiling tokens each, before its first token."""
        e = self.engine
        return math.ceil(e.max_queued / e.max_batch_rows) * e.max_new_tokens_ceiling * self.decode_step_s

    @property
    def stream_timeout_min(self) -> int:
        return math.ceil(self.silence_s * 1.2 / 60)  # a fifth more, in whole minutes


@dataclass(frozen=True)
class HaproxyConfig:
    servers: StaticServers | DnsServers
    bind: str = "127.0.0.1:8080"
    adapter_balance: Balance = "hash"  # roundrobin: for comparison only (bench/cluster.py)
    hash_balance_factor: int = 125
    timing: Timing = field(default_factory=Timing)
    stats_socket: str | None = None  # a Unix socket for `show stat` (the local cluster reads server states)
    metrics_bind: str | None = None  # HAProxy's own Prometheus metrics at http://THIS/metrics
    log_stdout: bool = False
    health_service: str = GENERATION_SERVICE  # SERVING once the model is loaded and warm; NOT_SERVING on drain


def render(config: HaproxyConfig) -> str:
    t = config.timing
    lines = [
        "# loramux replicas behind HAProxy: cleartext HTTP/2 (h2c) in front and behind, one gRPC call per",
        "# HTTP/2 stream, each balanced on its own.",
        "# Rendered by loramux.deploy.haproxy_config (edit the choices there, not this output).",
        f"# Tested on {TESTED_ON}; needs 2.2 or later (tcp-check min-recv,",
        "# proto h2 on servers).",
        "",
        "global",
        "    # Error details travel in the grpc-status-details-bin trailer; the default 16384-byte buffer fails",
        "    # header blocks above ~11 KB, 32768 passes 20 KB (gRPC clients' own metadata limit is 8 KB).",
        "    tune.bufsize 32768",
        *([f"    stats socket {config.stats_socket} mode 600 level admin"] if config.stats_socket else []),
        *(["    log stdout format raw local0"] if config.log_stdout else []),
        *_resolvers(config.servers),
        "",
        "defaults",
        "    mode http",
        *(
            ["    log global", "    option httplog  # every gRPC call logs HTTP 200: the status is in trailers"]
            if config.log_stdout
            else []
        ),
        "    # A refused or unreachable replica fails fast, and `retries` moves the call on (this also bounds the",
        "    # turn-around pause HAProxy takes before a retry: min(timeout connect, 1 s)).",
        f"    timeout connect {_duration(t.connect_timeout_ms)}",
        "    # Inactivity timers, not durations: a stream that sends a token every decode step is never cut, but a",
        '    # call that waits silently longer is cut (the client sees UNKNOWN "Stream removed"). The longest',
        f"    # silence is the queue wait before a first token: --max-queued {t.engine.max_queued} / "
        f"--max-batch-rows {t.engine.max_batch_rows}",
        f"    # = {math.ceil(t.engine.max_queued / t.engine.max_batch_rows)} batches ahead, each of up to "
        f"--max-new-tokens-ceiling {t.engine.max_new_tokens_ceiling} tokens at ~{t.decode_step_s * 1000:.0f} ms "
        f"a step: {t.silence_s / 60:.1f} min.",
        "    # Raise these with those flags; clients' deadlines bound each call anyway.",
        f"    timeout server {t.stream_timeout_min}m",
        f"    timeout client {t.stream_timeout_min}m",
        "    timeout http-request 10s",
        f"    timeout check {_duration(t.check_timeout_ms)}",
        "    # A connection a replica refused (stopped, restarting, killed) is retried on another replica, at",
        "    # every retry (redispatch 1). empty-response also retries a call the replica closed without a byte of",
        "    # answer (killed while the call was queued): nothing was generated for the client yet, so it is safe.",
        "    # Calls that already streamed are never retried: they end with a status.",
        "    retries 3",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response",
        "",
        "frontend loramux",
        f"    bind {config.bind} proto h2",
        f"    # Generate calls naming an adapter carry it as {ADAPTER_KEY} (the server checks it agrees with",
        "    # the body); everything else (the base model, the default adapter, admin RPCs, health) has no key.",
        f"    use_backend loramux_adapters if {{ hdr_len({ADAPTER_KEY}) gt 0 }}",
        "    default_backend loramux_base",
        *_metrics_frontend(config.metrics_bind),
        "",
        "backend loramux_adapters",
        *_adapter_balance(config),
        *_health_check(config, explain=True),
        *_servers(config),
        "",
        "backend loramux_base",
        "    # Base-model calls share no adapter: spread them by the calls each replica has running.",
        "    balance leastconn",
        "    # Readiness and draining: as in loramux_adapters.",
        *_health_check(config, explain=False),
        *_servers(config),
        "",
    ]
    return "\n".join(lines)


def _duration(ms: int) -> str:
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _adapter_balance(config: HaproxyConfig) -> list[str]:
    if config.adapter_balance == "roundrobin":
        return [
            "    # Round-robin: every replica sees every adapter (a comparison baseline, not for use).",
            "    balance roundrobin",
        ]
    f = config.hash_balance_factor
    return [
        "    # One adapter, one replica: its weights stay resident there and its rows batch together. Consistent",
        "    # hashing moves only the adapters of a replica that comes or goes. Bounded loads: no replica takes",
        f"    # more than {f} % of the average number of running calls, so a hot adapter spills onto the next",
        "    # replicas of its hash ring instead of queueing on one (150-200 favour affinity over evenness).",
        f"    balance hdr({ADAPTER_KEY})",
        "    hash-type consistent",
        f"    hash-balance-factor {f}",
    ]


def _health_check(config: HaproxyConfig, *, explain: bool) -> list[str]:
    t = config.timing
    probe = grpc_probe.check_request(config.health_service)
    why = [
        f"    # Readiness: a real grpc.health.v1.Health/Check of {config.health_service} over raw HTTP/2",
        "    # (deploy/grpc_probe.py). The first expect waits for the answer's DATA frame, whatever its status;",
        "    # the second (min-recv 0: conclusive) needs SERVING, so NOT_SERVING fails at once.",
        "    # Draining: a replica given SIGTERM turns NOT_SERVING first and is DOWN here within",
        f"    # fall x inter + timeout check = {t.detection_s:g} s; run the replicas with --drain-delay of at least",
        "    # that. Running streams are never cut when a replica goes DOWN (no on-marked-down",
        "    # shutdown-sessions): they finish within the replica's --grace-period.",
    ]
    return [
        *(why if explain else []),
        "    option tcp-check",
        "    tcp-check connect",
        f"    tcp-check send-binary {probe.hex()}",
        f"    tcp-check expect binary {grpc_probe.any_status_prefix().hex()}",
        f"    tcp-check expect min-recv 0 binary {grpc_probe.response_frame(grpc_probe.SERVING).hex()}",
        f"    default-server proto h2 check inter {t.check_interval_ms}ms fall {t.fall} rise {t.rise}",
    ]


def _servers(config: HaproxyConfig) -> list[str]:
    servers = config.servers
    if isinstance(servers, StaticServers):
        return [f"    server {name} {address}" for name, address in servers.servers]
    return [
        f"    # Up to {servers.slots} replicas: one slot per address the name resolves to, filled and emptied",
        "    # as pods come and go (a headless Service lists ready pods only).",
        f"    server-template {servers.prefix} {servers.slots} {servers.fqdn}:{servers.port} "
        "resolvers cluster_dns init-addr none resolve-prefer ipv4",
    ]


def _resolvers(servers: StaticServers | DnsServers) -> list[str]:
    if not isinstance(servers, DnsServers):
        return []
    return [
        "",
        "resolvers cluster_dns",
        "    # The cluster's DNS (from /etc/resolv.conf), asked again every second: a new pod is used, and a",
        "    # deleted one dropped, within a few seconds (the health check sees a draining one sooner).",
        "    parse-resolv-conf",
        "    resolve_retries 3",
        "    timeout resolve 1s",
        "    timeout retry 1s",
        "    hold valid 5s",
        "    hold obsolete 5s",
        "    hold nx 5s",
        "    hold other 10s",
        "    hold refused 10s",
        "    hold timeout 10s",
        "    accepted_payload_size 8192",
    ]


def _metrics_frontend(bind: str | None) -> list[str]:
    if bind is None:
        return []
    return [
        "",
        "frontend haproxy_metrics",
        "    mode http",
        f"    bind {bind}",
        "    http-request use-service prometheus-exporter if { path /metrics }",
        "    http-request return status 200 content-type text/plain string ok if { path /healthz }",
    ]


# -- the two committed examples ------------------------------------------------------------------------

KUBERNETES_REPLICAS = "loramux-replicas.loramux.svc.cluster.local"  # deploy/kubernetes/service.yaml


def local_example() -> HaproxyConfig:
    """deploy/haproxy/haproxy.cfg: three replicas on loopback ports 50051-50053, HAProxy on 8080."""
    servers = tuple((f"replica-{i}", f"127.0.0.1:{50050 + i}") for i in (1, 2, 3))
    return HaproxyConfig(servers=StaticServers(servers), bind="127.0.0.1:8080")


def kubernetes_example() -> HaproxyConfig:
    """deploy/kubernetes/haproxy.yaml's ConfigMap: replicas through the headless Service's DNS name."""
    return HaproxyConfig(
        servers=DnsServers(fqdn=KUBERNETES_REPLICAS, port=50051),
        bind=":50051",
        metrics_bind=":8405",
        log_stdout=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="print loramux's HAProxy configuration")
    parser.add_argument("--kubernetes", action="store_true", help="the Kubernetes one (DNS discovery)")
    args = parser.parse_args(argv)
    print(render(kubernetes_example() if args.kubernetes else local_example()), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
