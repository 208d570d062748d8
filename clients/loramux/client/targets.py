"""Where the CLI sends a command: one server, or every replica of a deployment.

Adapter admin RPCs change one replica's state only (behind a load balancer they reach whichever replica it
picks), so the CLI can apply one to every replica: ``--target`` is repeatable and takes comma lists, and
``dns:///HOST:PORT`` stands for every address HOST resolves to (each A and AAAA record; a Kubernetes headless
Service resolves to its ready pods). gRPC's own ``dns:///`` resolver would pick one address; this lists them all.
"""

from __future__ import annotations

import concurrent.futures
import io
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

DNS_SCHEME = "dns:///"
MAX_PARALLEL = 16  # replicas asked at once
Resolver = Callable[..., list[tuple[Any, ...]]]  # socket.getaddrinfo's shape


class TargetError(ValueError):
    """A target that names no server: an empty entry, a dns:/// name without a port or that does not resolve."""


def expand(specs: Iterable[str], *, resolve: Resolver = socket.getaddrinfo) -> list[str]:
    """Every server the --target values name, in order, each once."""
    targets: list[str] = []
    for spec in specs:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                raise TargetError(f"empty target in {spec!r}")
            for target in _resolve(part, resolve) if part.startswith(DNS_SCHEME) else [part]:
                if target not in targets:
                    targets.append(target)
    return targets


def _resolve(spec: str, resolve: Resolver) -> list[str]:
    name = spec.removeprefix(DNS_SCHEME)
    host, sep, port = name.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise TargetError(f"{spec!r}: expected dns:///HOST:PORT")
    try:
        infos = resolve(host, int(port), type=socket.SOCK_STREAM)
    except OSError as exc:
        raise TargetError(f"{spec!r}: {host} does not resolve ({exc})") from None
    addresses = sorted({info[4][0] for info in infos})
    if not addresses:
        raise TargetError(f"{spec!r}: {host} resolves to no address")
    return [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses]


@dataclass(frozen=True)
class Outcome:
    """What one replica answered: its exit status (0: success), and what the command printed."""

    target: str
    status: int
    out: str
    err: str


Command = Callable[[str, TextIO, TextIO], int]  # (target, out, err) -> exit status


def fan_out(targets: Sequence[str], command: Command) -> list[Outcome]:
    """Run ``command`` against every target, several at once; the outcomes in the targets' order."""

    def one(target: str) -> Outcome:
        out, err = io.StringIO(), io.StringIO()
        try:
            status = command(target, out, err)
        except Exception as exc:  # a replica's failure is reported with the others, never stops them
            err.write(f"error: {exc}\n")
            status = 1
        return Outcome(target, status, out.getvalue(), err.getvalue())

    with concurrent.futures.ThreadPoolExecutor(min(MAX_PARALLEL, len(targets))) as pool:
        return list(pool.map(one, targets))


def report(outcomes: Sequence[Outcome], out: TextIO, err: TextIO) -> int:
    """Each replica's output under a header, then a summary on stderr; 1 if any replica failed, else 0."""
    for o in outcomes:
        out.write(f"== {o.target}{'' if o.status == 0 else ' (failed)'}\n{o.out}")
        out.flush()
        err.write("".join(f"{o.target}: {line}\n" for line in o.err.splitlines()))
    failed = [o.target for o in outcomes if o.status != 0]
    summary = f"{len(outcomes) - len(failed)} of {len(outcomes)} replicas succeeded"
    err.write(summary + (f"; failed: {', '.join(failed)}\n" if failed else "\n"))
    return 1 if failed else 0
