"""The HAProxy configuration: the committed files are what loramux.deploy.haproxy_config renders, HAProxy accepts
every variant (`haproxy -c`), and the raw HTTP/2 health probe is a real Health/Check that a loramux server
answers with the bytes the check expects."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import hpack
import pytest
import yaml
from grpc_health.v1 import health_pb2

from loramux.core import EngineConfig
from loramux.deploy import grpc_probe
from loramux.deploy import haproxy_config as hc
from loramux.deploy.cluster import ClusterSpec, _shared_flags
from tests.deploy.conftest import haproxy_or_skip

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
KUBERNETES = ROOT / "deploy" / "kubernetes" / "haproxy.yaml"
REGENERATE = "regenerate it: python -m loramux.deploy.haproxy_config [--kubernetes]"


def kubernetes_config_map() -> str:
    (config_map,) = [d for d in yaml.safe_load_all(KUBERNETES.read_text()) if d["kind"] == "ConfigMap"]
    return config_map["data"]["haproxy.cfg"]


def test_committed_configs_are_the_rendered_ones():
    assert LOCAL.read_text() == hc.render(hc.local_example()), REGENERATE
    assert kubernetes_config_map() == hc.render(hc.kubernetes_example()), REGENERATE


VARIANTS = {
    "local": lambda: hc.render(hc.local_example()),
    "kubernetes": lambda: hc.render(hc.kubernetes_example()),
    "roundrobin": lambda: hc.render(hc.HaproxyConfig(servers=hc.local_example().servers, adapter_balance="roundrobin")),
    "committed-local": LOCAL.read_text,
    "committed-kubernetes": kubernetes_config_map,
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_haproxy_accepts_the_config(variant, tmp_path):
    binary = haproxy_or_skip()
    path = tmp_path / "haproxy.cfg"
    path.write_text(VARIANTS[variant]())
    done = subprocess.run([binary, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Configuration file is valid" in done.stdout


def test_the_config_says_what_it_does():
    text = hc.render(hc.local_example())
    for line in (
        "bind 127.0.0.1:8080 proto h2",
        "use_backend loramux_adapters if { hdr_len(x-loramux-adapter) gt 0 }",
        "balance hdr(x-loramux-adapter)",
        "hash-type consistent",
        "hash-balance-factor 125",
        "balance leastconn",
        "default-server proto h2 check inter 500ms fall 2 rise 2",
        "retries 3",
        "option redispatch 1",
        "tune.bufsize 32768",
        "timeout server 10m",
    ):
        assert f"    {line}\n" in text, line
    assert "shutdown-sessions" not in text.replace("no on-marked-down\n    # shutdown-sessions", "")
    assert text.startswith("# loramux") and "Tested on HAProxy 2.6.12" in text


def test_timeouts_follow_the_server_limits():
    timing = hc.Timing()
    engine = EngineConfig()
    assert timing.silence_s == (engine.max_queued // engine.max_batch_rows) * engine.max_new_tokens_ceiling * 0.03
    assert timing.stream_timeout_min * 60 >= timing.silence_s
    longer = hc.Timing(engine=EngineConfig(max_queued=1024))
    assert longer.stream_timeout_min > timing.stream_timeout_min
    assert f"timeout server {longer.stream_timeout_min}m" in hc.render(
        hc.HaproxyConfig(servers=hc.local_example().servers, timing=longer)
    )
    # the local cluster drains its replicas for at least as long as HAProxy takes to see them go
    flags = _shared_flags(ClusterSpec())
    assert float(flags[flags.index("--drain-delay") + 1]) >= timing.detection_s == 2.0


def test_the_probe_is_a_health_check_request():
    probe = grpc_probe.check_request("loramux.v1.GenerationService")
    assert probe.startswith(grpc_probe.PREFACE)
    frames, rest = [], probe[len(grpc_probe.PREFACE) :]
    while rest:
        length = int.from_bytes(rest[:3], "big")
        frames.append((rest[3], rest[4], int.from_bytes(rest[5:9], "big"), rest[9 : 9 + length]))
        rest = rest[9 + length :]
    (settings, headers, data) = frames
    assert settings == (0x4, 0, 0, b"")
    assert headers[:3] == (0x1, 0x4, 1)  # HEADERS, END_HEADERS, stream 1
    assert hpack.Decoder().decode(headers[3]) == [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/grpc.health.v1.Health/Check"),
        (":authority", "loramux"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    assert data[:3] == (0x0, 0x1, 1)  # DATA, END_STREAM, stream 1
    body = data[3]
    assert body[0] == 0 and int.from_bytes(body[1:5], "big") == len(body) - 5
    assert health_pb2.HealthCheckRequest.FromString(body[5:]).service == "loramux.v1.GenerationService"


def ask(target: str, service: str) -> bytes:
    """Send the probe to a server and read until its answer's trailers (END_STREAM on stream 1) arrive."""
    host, port = target.rsplit(":", 1)
    answer = b""
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(grpc_probe.check_request(service))
        while b"grpc-status" not in answer:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def test_a_serving_server_answers_with_the_expected_frame(make_server):
    server = make_server()
    answer = ask(server.target, "loramux.v1.GenerationService")
    assert grpc_probe.response_frame(grpc_probe.SERVING) in answer
    assert grpc_probe.any_status_prefix() in answer


def test_a_loading_server_answers_not_serving(make_server):
    server = make_server(with_engine=False)  # as while the model loads: GenerationService NOT_SERVING
    answer = ask(server.target, "loramux.v1.GenerationService")
    assert grpc_probe.any_status_prefix() in answer  # the first expect passes: the answer came
    assert grpc_probe.response_frame(grpc_probe.SERVING) not in answer  # the second fails at once
    assert grpc_probe.response_frame(health_pb2.HealthCheckResponse.NOT_SERVING) in answer
