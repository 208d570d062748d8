"""The metadata a load balancer routes on, and the metadata that tells which replica answered.

``x-loramux-adapter`` (sent by the clients on Generate) is the routing key of an adapter-hashing balancer
(deploy/haproxy): the adapter the body names, the first member of an ``adapter_mix``, nothing (or "") for the
bare base model. A balancer cannot read protobuf bodies, so the key travels beside the body, and the server
checks that the two agree: a call routed for one adapter and served with another would silently defeat the
affinity (and every replica's adapter budget). A request that names no adapter runs with the replica's
default: the header is then optional and, when present, must be that default ("" when it is the base model).

``x-loramux-replica`` is in the initial metadata of every successful response (and in the trailer of every
error), so which replica served a call is observable through any balancer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from loramux.service.errors import AdapterMetadataMismatchError
from loramux.v1 import generation_service_pb2 as gpb

ADAPTER_KEY = "x-loramux-adapter"
REPLICA_KEY = "x-loramux-replica"
# A metadata value must be printable ASCII; this is narrower: what a host:port, a pod name or an id is made of.
_REPLICA_ID = re.compile(r"[A-Za-z0-9_.:\-\[\]/]{1,128}")


def valid_replica_id(value: str) -> bool:
    return bool(_REPLICA_ID.fullmatch(value))


def adapter_headers(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[str, ...]:
    """Every value of x-loramux-adapter in a call's metadata (usually none or one)."""
    return tuple(v for k, v in metadata or () if k == ADAPTER_KEY and isinstance(v, str))


def body_adapter(request: gpb.GenerateRequest) -> str | None:
    """What the body routes to: the adapter ("" for the base model), the mix's first member; None when it
    names no adapter (the replica's default applies)."""
    if request.adapter_mix:
        return request.adapter_mix[0].name
    return request.adapter if request.HasField("adapter") else None


def check_body(headers: tuple[str, ...], request: gpb.GenerateRequest) -> None:
    """Before any work: the header agrees with the adapter the body names (requests naming none: see
    ``check_default``)."""
    expected = body_adapter(request)
    if expected is not None:
        where = "the first member of adapter_mix" if request.adapter_mix else "the request's adapter"
        _check(headers, expected, where=where)


def check_default(headers: tuple[str, ...], request: gpb.GenerateRequest, resolved: str | None) -> None:
    """Once admitted, for a request that names no adapter: a header present must be the default it runs with."""
    if body_adapter(request) is None:
        _check(headers, resolved or "", where="this replica's default adapter")


def _check(headers: tuple[str, ...], expected: str, *, where: str) -> None:
    for value in headers:
        if value != expected:
            raise AdapterMetadataMismatchError(
                f'metadata {ADAPTER_KEY}={value!r} disagrees with {where} {expected!r} ("" is the base model): '
                "a load balancer routing on it would send the call to another adapter's replica",
                field=ADAPTER_KEY,
                metadata={"metadataKey": ADAPTER_KEY, "metadataValue": value, "expected": expected},
            )
