"""``loramux-server`` (``python -m loramux.service``): parse the command line (and HF_TOKEN) once into a frozen
ServiceConfig, then serve.

This is the only module that reads flags or the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from loramux.core import EngineConfig
from loramux.core.adapters.names import validate_adapter_name
from loramux.core.engine.config import KV_MEMORY_FRACTION, PREFIX_CACHE_DEFAULT_BYTES, PREFIX_CACHE_MEMORY_FRACTION
from loramux.core.errors import InvalidArgumentError
from loramux.core.model.loader import DTYPES, ModelSpec
from loramux.service.auth import BearerTokens, load_tokens
from loramux.service.config import (
    DEFAULT_ADAPTERS_DIR,
    DEFAULT_MODEL_DIR,
    AdapterPreload,
    MiB,
    NetworkConfig,
    ServiceConfig,
    TlsFiles,
    demo_adapters,
)
from loramux.service.kernel_flags import add_kernel_flags, kernel_settings
from loramux.service.logs import LOG_FORMATS, configure_logging
from loramux.service.routing import valid_replica_id
from loramux.service.server import serve
from loramux.service.sizes import format_size, parse_size

_ENGINE, _NET = EngineConfig(), NetworkConfig()
_ENGINE_FLAGS = (  # EngineConfig field, help
    ("max_batch_rows", "requests decoded together (concurrent generations)"),
    ("max_queued", "requests waiting for a batch row; beyond: RESOURCE_EXHAUSTED"),
    ("max_prompt_tokens", "prompt tokens per request; beyond: RESOURCE_EXHAUSTED"),
    ("default_max_new_tokens", "max_new_tokens when a request sets none"),
    ("max_new_tokens_ceiling", "largest max_new_tokens a request may ask"),
    ("max_prefill_tokens", "padded prompt columns prefilled per step, cached ones included; more join next steps"),
    ("prefill_chunk_tokens", "longer prompts are prefilled this many tokens per step, between decode steps"),
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def _non_negative_int(text: str) -> int:
    if (value := int(text)) < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {value})")
    return value


def _fraction(text: str) -> float:
    if not 0 <= (value := float(text)) <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (got {text})")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {text})")
    return value


def _size(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte (got {text!r})")
    return value


def _size_or_zero(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _adapter(text: str) -> AdapterPreload:
    name, sep, source = text.partition("=")
    if not sep or not source:
        raise argparse.ArgumentTypeError(f"expected NAME=SOURCE (got {text!r})")
    try:
        validate_adapter_name(name)
    except InvalidArgumentError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return AdapterPreload(name=name, source=source)


def _replica_id(text: str) -> str:
    if not valid_replica_id(text):
        raise argparse.ArgumentTypeError(f"1-128 letters, digits or any of _.:-[]/ (got {text!r})")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loramux-server", description="loramux gRPC server")
    _model_flags(parser.add_argument_group("model"))
    _adapter_flags(parser.add_argument_group("adapters"))
    _engine_flags(parser.add_argument_group("engine limits"))
    add_kernel_flags(parser.add_argument_group("kernels"))
    _network_flags(parser.add_argument_group("network and lifecycle"))
    return parser


def _model_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--model", help=f"base model folder or Hub repo id (default: the demo model, {DEFAULT_MODEL_DIR})")
    g.add_argument("--model-revision", help="Hub revision of --model")
    g.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: the checkpoint's)")
    g.add_argument("--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--hub-cache-dir", help="Hugging Face Hub cache for the model and Hub adapters")
    g.add_argument("--no-warm-up", dest="warm_up", action="store_false", help="skip the warm-up generation")


def _adapter_flags(g: argparse._ArgumentGroup) -> None:
    preload = "preload (pinned) an adapter from a folder or Hub repo; repeatable"
    g.add_argument("--adapter", type=_adapter, action="append", default=[], metavar="NAME=SOURCE", help=preload)
    g.add_argument("--default-adapter", metavar="NAME", help="default adapter (default: the bare base model)")
    g.add_argument("--max-adapters", type=_positive_int, default=64, help="resident adapters at most (default 64)")
    g.add_argument(
        "--max-adapter-memory",
        type=_size,
        metavar="SIZE",
        help="bytes of resident adapters at most, e.g. 2GiB (default: no limit but --max-adapters)",
    )
    g.add_argument(
        "--load-on-demand",
        action="store_true",
        help="a Generate naming an unregistered adapter loads it: the folder NAME under each --adapter-root, "
        "then (unless --no-hub-adapters) the Hub repo NAME",
    )
    g.add_argument("--max-rank", type=_positive_int, default=256, help="largest LoRA rank accepted (default 256)")
    g.add_argument(
        "--adapter-root",
        action="append",
        metavar="DIR",
        help="LoadAdapter may read local folders only inside DIR (repeatable; default: any folder); "
        "--adapter preloads are not restricted; with --load-on-demand, where unregistered names are looked for",
    )
    g.add_argument(
        "--no-hub-adapters",
        dest="allow_hub_adapters",
        action="store_false",
        help="refuse adapters from the Hugging Face Hub: LoadAdapter (PERMISSION_DENIED) and load on demand",
    )


def _engine_flags(g: argparse._ArgumentGroup) -> None:
    for name, help_text in _ENGINE_FLAGS:
        default = getattr(_ENGINE, name)
        flag = "--" + name.replace("_", "-")
        g.add_argument(flag, type=_positive_int, default=default, help=f"{help_text} (default {default})")
    g.add_argument(
        "--max-total-tokens",
        type=_positive_int,
        help="prompt + new tokens per request; beyond: RESOURCE_EXHAUSTED (default: the model's context length)",
    )
    g.add_argument(
        "--max-model-len",
        type=_positive_int,
        help="lower the model's context length (its position count, read from its config); never above it",
    )
    g.add_argument(
        "--max-kv-memory",
        type=_size,
        metavar="SIZE",
        help=f"bytes the batch's KV cache may hold, e.g. 8GiB; requests wait for room (default: "
        f"{KV_MEMORY_FRACTION * 100:.0f}%% of the memory available when the engine starts)",
    )
    g.add_argument(
        "--prefix-cache-memory",
        type=_size_or_zero,
        metavar="SIZE",
        help=(
            "bytes of prompt KV kept for reuse by prompts that start the same way (same adapter and version), "
            f"e.g. 2GiB; 0 turns the prefix cache off (default: {format_size(PREFIX_CACHE_DEFAULT_BYTES)}, at most "
            f"{PREFIX_CACHE_MEMORY_FRACTION * 100:.0f}%% of the memory available)"
        ),
    )
    g.add_argument(
        "--prefix-block-tokens",
        type=_positive_int,
        default=_ENGINE.prefix_block_tokens,
        help=f"tokens per prefix-cache block; prompts reuse whole blocks (default {_ENGINE.prefix_block_tokens})",
    )
    wait, fraction = _ENGINE.join_wait_steps, _ENGINE.join_fraction
    g.add_argument(
        "--join-wait-steps",
        type=_non_negative_int,
        default=wait,
        help=f"while rows run, a prefill group of fewer than --join-fraction of them waits up to this many steps "
        f"for more ready requests (prefilled together); 0: at once (default {wait})",
    )
    g.add_argument("--join-fraction", type=_fraction, default=fraction, help=f"see above (default {fraction})")


def _network_flags(g: argparse._ArgumentGroup) -> None:
    net = _NET
    g.add_argument("--host", default=net.host, help=f"address to bind (default {net.host}; 0.0.0.0 or :: for all)")
    g.add_argument("--port", type=int, default=net.port, help=f"port (default {net.port}; 0: a free one, printed)")
    mib = net.max_message_bytes // MiB
    g.add_argument("--max-message-mb", type=_positive_int, default=mib, help=f"largest message, MiB (default {mib})")
    g.add_argument("--keepalive-time-ms", type=_positive_int, default=net.keepalive_time_ms)
    g.add_argument("--keepalive-timeout-ms", type=_positive_int, default=net.keepalive_timeout_ms)
    ping = net.min_client_ping_interval_ms
    g.add_argument(
        "--min-client-ping-interval-ms",
        type=_positive_int,
        default=ping,
        help=f"clients pinging more often are disconnected (default {ping})",
    )
    g.add_argument("--tls-cert-file", metavar="PEM", help="serve TLS with this certificate chain (with --tls-key-file)")
    g.add_argument("--tls-key-file", metavar="PEM", help="the certificate's private key")
    g.add_argument("--tls-client-ca-file", metavar="PEM", help="require client certificates signed by this CA (mTLS)")
    g.add_argument("--grace-period", type=_non_negative_float, default=10.0, help="seconds in-flight RPCs get at stop")
    g.add_argument(
        "--drain-delay",
        type=_non_negative_float,
        default=0.0,
        help="seconds between health NOT_SERVING and refusing new work at shutdown (default 0)",
    )
    g.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off; 0: a free port, printed)",
    )
    g.add_argument(
        "--replica-id",
        type=_replica_id,
        metavar="ID",
        help="names this replica in every response's x-loramux-replica metadata (default: HOST:PORT as bound; "
        "the machine's name for a wildcard --host)",
    )
    g.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    g.add_argument("--log-format", default="text", choices=LOG_FORMATS, help="text lines or one JSON object per line")
    g.add_argument(
        "--auth-tokens-file",
        metavar="FILE",
        help="require `authorization: Bearer TOKEN` on loramux RPCs; FILE has `ROLE TOKEN` lines, role admin "
        "(every RPC) or generate (Generate, Tokenize, ListAdapters, GetAdapter) (default: off)",
    )


def config_from_args(args: argparse.Namespace, environ: dict[str, str]) -> ServiceConfig:
    """The frozen config; raises ValueError with a message for the user."""
    adapters: list[AdapterPreload] = list(args.adapter)
    if args.model is None:
        if not DEFAULT_MODEL_DIR.is_dir():
            raise ValueError(
                f"no --model given and the embedded demo model is not at {DEFAULT_MODEL_DIR} yet "
                "(build them with `make demo-assets`, or pass --model FOLDER_OR_HUB_ID)"
            )
        adapters = [*demo_adapters(DEFAULT_ADAPTERS_DIR), *adapters]
    names = [a.name for a in adapters]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"adapter names given more than once: {', '.join(duplicates)}")
    if args.load_on_demand and not args.adapter_root and not args.allow_hub_adapters:
        raise ValueError("--load-on-demand needs an --adapter-root or Hub adapters (it has neither to look in)")
    if args.default_adapter and args.default_adapter not in names:
        raise ValueError(f"--default-adapter {args.default_adapter!r} is not among the preloaded adapters {names}")
    token = environ.get("HF_TOKEN") or None
    auth_tokens = _auth_tokens(args.auth_tokens_file)
    model = ModelSpec(
        source=str(args.model or DEFAULT_MODEL_DIR),
        dtype=args.dtype,
        device=args.device,
        revision=args.model_revision,
        cache_dir=args.hub_cache_dir,
        token=token,
    )
    engine = EngineConfig(
        **{name: getattr(args, name) for name, _ in _ENGINE_FLAGS},
        max_total_tokens=args.max_total_tokens,
        max_model_len=args.max_model_len,
        max_kv_bytes=args.max_kv_memory,
        prefix_cache_bytes=args.prefix_cache_memory,
        prefix_block_tokens=args.prefix_block_tokens,
        **kernel_settings(args),
        join_wait_steps=args.join_wait_steps,
        join_fraction=args.join_fraction,
    )
    network = NetworkConfig(
        host=args.host,
        port=args.port,
        max_message_bytes=args.max_message_mb * MiB,
        keepalive_time_ms=args.keepalive_time_ms,
        keepalive_timeout_ms=args.keepalive_timeout_ms,
        min_client_ping_interval_ms=args.min_client_ping_interval_ms,
        tls=_tls_files(args.tls_cert_file, args.tls_key_file, args.tls_client_ca_file),
    )
    return ServiceConfig(
        model=model,
        network=network,
        engine=engine,
        adapters=tuple(adapters),
        default_adapter=args.default_adapter,
        max_adapters=args.max_adapters,
        max_adapter_bytes=args.max_adapter_memory,
        load_on_demand=args.load_on_demand,
        max_rank=args.max_rank,
        hub_token=token,
        hub_cache_dir=args.hub_cache_dir,
        grace_period_s=args.grace_period,
        drain_delay_s=args.drain_delay,
        warm_up=args.warm_up,
        metrics_port=args.metrics_port,
        auth_tokens=auth_tokens,
        adapter_roots=_adapter_roots(args.adapter_root),
        allow_hub_adapters=args.allow_hub_adapters,
        replica_id=args.replica_id,
    )


def _tls_files(cert: str | None, key: str | None, client_ca: str | None) -> TlsFiles | None:
    if cert is None and key is None:
        if client_ca is not None:
            raise ValueError("--tls-client-ca-file needs --tls-cert-file and --tls-key-file")
        return None
    if cert is None or key is None:
        raise ValueError("--tls-cert-file and --tls-key-file go together")
    missing = [p for p in (cert, key, client_ca) if p is not None and not Path(p).is_file()]
    if missing:
        raise ValueError(f"TLS file not found: {', '.join(missing)}")
    return TlsFiles(cert=Path(cert), key=Path(key), client_ca=Path(client_ca) if client_ca else None)


def _adapter_roots(roots: list[str] | None) -> tuple[str, ...] | None:
    if roots is None:
        return None
    missing = [r for r in roots if not Path(r).expanduser().is_dir()]
    if missing:
        raise ValueError(f"--adapter-root: not a folder: {', '.join(missing)}")
    return tuple(str(Path(r).expanduser()) for r in roots)


def _auth_tokens(path: str | None) -> BearerTokens | None:
    if path is None:
        return None
    try:
        return load_tokens(Path(path))
    except OSError as exc:
        raise ValueError(f"--auth-tokens-file: cannot read {path}: {exc.strerror}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args, dict(os.environ))
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging(level=args.log_level, log_format=args.log_format)
    try:
        return asyncio.run(serve(config))
    except (OSError, RuntimeError) as exc:  # e.g. the port is taken
        print(f"loramux: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
