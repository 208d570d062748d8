"""The service's one configuration object, built once in service/__main__.py and passed down (frozen).

Nothing here reads the environment or the file system at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc

from loramux.core import EngineConfig
from loramux.core.model.loader import ModelSpec
from loramux.demo import ADAPTERS_DIR, MODEL_DIR
from loramux.service.auth import BearerTokens

# The embedded demo model, served when --model is absent, and its adapters (every folder is preloaded with it):
# package data of loramux.demo, so an installed server has them too.
DEFAULT_MODEL_DIR = MODEL_DIR
DEFAULT_ADAPTERS_DIR = ADAPTERS_DIR

ADAPTER_SERVICE = "loramux.v1.AdapterService"
GENERATION_SERVICE = "loramux.v1.GenerationService"
ERROR_DOMAIN = "loramux.dev"
MiB = 1 << 20


@dataclass(frozen=True)
class AdapterPreload:
    """An adapter loaded (pinned) at start-up: ``--adapter NAME=SOURCE``."""

    name: str
    source: str


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for serving TLS; with ``client_ca``, clients must present a certificate it signed (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        """Read the files (at start-up: a bad path fails before the port opens)."""
        pair = [(self.key.read_bytes(), self.cert.read_bytes())]
        if self.client_ca is None:
            return grpc.ssl_server_credentials(pair)
        return grpc.ssl_server_credentials(
            pair, root_certificates=self.client_ca.read_bytes(), require_client_auth=True
        )


@dataclass(frozen=True)
class NetworkConfig:
    """Listening address and the grpc channel arguments the server is built with."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0: pick a free port (printed on stdout)
    max_message_bytes: int = 16 * MiB  # both directions; grpc's own default receive limit is 4 MiB
    keepalive_time_ms: int = 30_000  # server pings an idle connection this often
    keepalive_timeout_ms: int = 10_000  # and drops it when the ping is not answered within this
    min_client_ping_interval_ms: int = 10_000  # clients may ping (keepalive) at most this often
    tls: TlsFiles | None = None  # None: plaintext HTTP/2

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel args with their real names (grpc.md §1.5-1.6; unknown names are silently ignored)."""
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", self.min_client_ping_interval_ms),
        ]


@dataclass(frozen=True)
class ServiceConfig:
    model: ModelSpec
    network: NetworkConfig = field(default_factory=NetworkConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    adapters: tuple[AdapterPreload, ...] = ()  # preloaded and pinned, in order
    default_adapter: str | None = None  # None: the bare base model
    max_adapters: int = 64  # AdapterManager: resident adapters at most (LRU eviction beyond)
    max_adapter_bytes: int | None = None  # AdapterManager: bytes of resident adapters at most; None: no limit
    load_on_demand: bool = False  # Generate may name unregistered adapters: ROOT/NAME, then the Hub
    max_rank: int = 256  # AdapterManager: adapters of a larger rank are refused
    hub_token: str | None = field(default=None, repr=False)  # for Hub adapter loads (HF_TOKEN)
    hub_cache_dir: str | None = None
    grace_period_s: float = 10.0  # in-flight RPCs get this long to finish on shutdown
    drain_delay_s: float = 0.0  # NOT_SERVING is announced this long before new work is refused
    warm_up: bool = True  # run one tiny generation before reporting SERVING
    metrics_port: int | None = None  # Prometheus /metrics over HTTP on network.host; None: off, 0: a free port
    auth_tokens: BearerTokens | None = None  # None: no authorization (service/auth.py)
    adapter_roots: tuple[str, ...] | None = None  # LoadAdapter: local folders only inside these; None: any
    allow_hub_adapters: bool = True  # LoadAdapter and load on demand: Hub repos allowed
    replica_id: str | None = None  # x-loramux-replica on every response; None: the address bound (server.py)

    def limits(self) -> dict[str, int]:
        """The configured limits by their API name (ErrorInfo metadata ``limit`` / ``limitValue``)."""
        e = self.engine
        return {
            "maxAdapters": self.max_adapters,
            **({"maxAdapterMemory": self.max_adapter_bytes} if self.max_adapter_bytes is not None else {}),
            "maxConcurrentGenerations": e.max_batch_rows,
            "maxQueuedGenerations": e.max_queued,
            "maxPromptTokens": e.max_prompt_tokens,
            **({"maxTotalTokens": e.max_total_tokens} if e.max_total_tokens is not None else {}),
            **({"maxKvMemory": e.max_kv_bytes} if e.max_kv_bytes is not None else {}),
        }


def demo_adapters(adapters_dir: Path = DEFAULT_ADAPTERS_DIR) -> tuple[AdapterPreload, ...]:
    """Every adapter folder of the embedded demo assets, named after its folder, sorted."""
    if not adapters_dir.is_dir():
        return ()
    return tuple(AdapterPreload(name=p.name, source=str(p)) for p in sorted(adapters_dir.iterdir()) if p.is_dir())
