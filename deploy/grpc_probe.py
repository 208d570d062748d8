"""A grpc.health.v1.Health/Check as raw HTTP/2 bytes, for load balancers without a gRPC health check.

HAProxy 2.6 has no native gRPC check, and ``http-check`` cannot read trailers (where gRPC puts its status). A
raw ``tcp-check`` can still ask a real question: it sends the HTTP/2 client preface, an empty SETTINGS frame,
then a HEADERS frame (stream 1, a POST to /grpc.health.v1.Health/Check) and one DATA frame holding the
HealthCheckRequest, and looks for the DATA frame of the answer. A gRPC server answers on stream 1 with HEADERS,
one DATA frame of 7 bytes (the 5-byte gRPC message prefix and HealthCheckResponse{status}), then trailers; the
check matches that DATA frame's bytes with status SERVING (1). NOT_SERVING (2) matches the frame but not the
status, which the check treats as a conclusive failure (no wait for ``timeout check``).

The header block is HPACK without Huffman coding and without indexing (RFC 7541), so the bytes are the same on
every run and readable in a hex dump.
"""

from __future__ import annotations

import struct

from grpc_health.v1 import health_pb2

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _SETTINGS = 0x0, 0x1, 0x4
_END_STREAM, _END_HEADERS = 0x1, 0x4
STREAM = 1
# HPACK static table indexes (RFC 7541 appendix A)
_METHOD_POST, _SCHEME_HTTP, _AUTHORITY, _PATH, _CONTENT_TYPE = 3, 6, 1, 4, 31
CHECK_PATH = "/grpc.health.v1.Health/Check"
SERVING = health_pb2.HealthCheckResponse.SERVING


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    """One HTTP/2 frame: 24-bit length, type, flags, 31-bit stream id, payload (RFC 9113 §4.1)."""
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer with an N-bit prefix (RFC 7541 §5.1); ``first`` holds the pattern bits above it."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out, value = [first | limit], value - limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes([*out, value])


def _string(text: str) -> bytes:
    raw = text.encode("ascii")
    return _integer(len(raw), 7) + raw  # H bit 0: no Huffman coding


def _literal(index: int, value: str) -> bytes:
    """Literal header field without indexing, name from the static table (RFC 7541 §6.2.2)."""
    return _integer(index, 4) + _string(value)


def _literal_new_name(name: str, value: str) -> bytes:
    return b"\x00" + _string(name) + _string(value)


def grpc_message(payload: bytes) -> bytes:
    """The gRPC length-prefixed message: compressed flag 0, 32-bit length, the bytes."""
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def check_request(service: str, *, authority: str = "loramux") -> bytes:
    """Everything the probe sends: preface, SETTINGS, HEADERS and DATA of one Health/Check of ``service``."""
    headers = (
        _integer(_METHOD_POST, 7, 0x80)  # indexed: :method POST
        + _integer(_SCHEME_HTTP, 7, 0x80)  # indexed: :scheme http
        + _literal(_PATH, CHECK_PATH)
        + _literal(_AUTHORITY, authority)
        + _literal(_CONTENT_TYPE, "application/grpc")
        + _literal_new_name("te", "trailers")
    )
    body = grpc_message(health_pb2.HealthCheckRequest(service=service).SerializeToString())
    return (
        PREFACE
        + frame(_SETTINGS, 0, 0, b"")
        + frame(_HEADERS, _END_HEADERS, STREAM, headers)
        + frame(_DATA, _END_STREAM, STREAM, body)
    )


def response_frame(status: int) -> bytes:
    """The DATA frame a gRPC server answers a Check with, for ``status``."""
    message = health_pb2.HealthCheckResponse(status=status).SerializeToString()
    return frame(_DATA, 0, STREAM, grpc_message(message))


def any_status_prefix() -> bytes:
    """The bytes of that DATA frame up to the status value: present once the answer arrived, whatever it says."""
    serving = response_frame(SERVING)
    return serving[:-1]
