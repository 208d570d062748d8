"""The Node.js client (clients/node: @grpc/grpc-js, a pure-JavaScript HTTP/2 stack) against a real server.

``node --test`` runs clients/node/test/loramux.test.js against a server started here on a free port; then this
side checks what the server saw. Needs ``node`` on PATH and clients/node/node_modules (``make node-deps``, which
``make test`` runs first); without them the tests are skipped, with the reason in pytest's summary.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import grpc_tools
import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2

from tests.service.harness import Harness, wait_until

REPO = Path(__file__).resolve().parents[2]
NODE_DIR = REPO / "clients" / "node"
THIRD_PARTY = NODE_DIR / "third_party"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"  # sent by the Node test with request id node-default
PROMPT = "Prove that the sum"


def node_or_skip() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed (no `node` on PATH): the Node client tests are skipped")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip("clients/node/node_modules is missing: run `make node-deps` (npm ci --prefix clients/node)")
    return node


def run_node(node: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, *args], cwd=NODE_DIR, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120
    )


def test_node_client_against_a_real_server(make_server, adapter_dirs, caplog):
    node = node_or_skip()
    caplog.set_level("INFO", logger="loramux.access")
    server: Harness = make_server(adapters={"math": adapter_dirs["math"]})
    source = str(adapter_dirs["poet"])  # loaded by the Node test as node-loaded
    env = {"LORAMUX_TARGET": server.target, "LORAMUX_ADAPTER": "math", "LORAMUX_ADAPTER_SOURCE": source}
    result = run_node(node, "--test", "--test-reporter=spec", "test/loramux.test.js", env=env)
    assert result.returncode == 0, f"node --test failed:\n{result.stdout}\n{result.stderr}"
    counts = dict(re.findall(r"^ℹ (pass|fail|skipped) (\d+)$", result.stdout, flags=re.MULTILINE))
    assert counts == {"pass": "13", "fail": "0", "skipped": "0"}, result.stdout  # every test ran

    # What the server saw: the cancelled and expired streams left the batch, and the ids and trace came through.
    wait_until(lambda: server.engine is not None and server.engine.running_rows == 0, what="every row to be freed")
    wait_until(lambda: "request_id=node-cancel status=CANCELLED" in caplog.text, what="the cancel in the log")
    # grpc-js resets the stream when its deadline passes; the server may see that before its own timer fires.
    deadline = ("request_id=node-deadline status=DEADLINE_EXCEEDED", "request_id=node-deadline status=CANCELLED")
    wait_until(lambda: any(line in caplog.text for line in deadline), what="the deadline in the log")
    (line,) = [r.getMessage() for r in caplog.records if "request_id=node-default " in r.getMessage()]
    assert f"traceparent=00-{TRACE_ID}-" in line and "adapter=node-loaded" in line and "status=OK" in line
    assert "request_id=node-404 status=NOT_FOUND" in caplog.text


NODE_AUTH_SCRIPT = """
const { LoramuxClient, grpc } = require('./src/loramux');
const target = process.env.LORAMUX_TARGET;
(async () => {
  const user = new LoramuxClient(target, { token: process.env.LORAMUX_TOKEN });
  const { adapters } = await user.listAllAdapters();
  console.log('listed', adapters.map((a) => a.name).join(','));
  const { finished } = await user.generateText({ text: 'Prove', stopping: { max_new_tokens: 2, ignore_eos: true } });
  console.log('generated', finished.usage.completion_tokens);
  await user.setAdapter({ name: 'math' }).catch((e) => console.log('set', grpc.status[e.code]));
  console.log('health', await new LoramuxClient(target).check('loramux.v1.GenerationService'));
  await new LoramuxClient(target).listAdapters({}).catch((e) => console.log('anonymous', grpc.status[e.code]));
})().catch((e) => { console.error(e); process.exit(1); });
"""


def test_node_client_sends_its_bearer_token(make_server, adapter_dirs):
    from loramux.service.auth import parse_tokens

    node = node_or_skip()
    tokens = parse_tokens("generate node-user-token\nadmin node-admin-token\n")
    server: Harness = make_server(adapters={"math": adapter_dirs["math"]}, auth_tokens=tokens)
    env = {"LORAMUX_TARGET": server.target, "LORAMUX_TOKEN": "node-user-token"}
    result = run_node(node, "-e", NODE_AUTH_SCRIPT, env=env)
    assert result.returncode == 0, f"node failed:\n{result.stdout}\n{result.stderr}"
    assert result.stdout.splitlines() == [
        "listed math",
        "generated 2",
        "set PERMISSION_DENIED",
        "health SERVING",
        "anonymous UNAUTHENTICATED",
    ]


NODE_TLS_SCRIPT = """
const fs = require('node:fs');
const { LoramuxClient, grpc } = require('./src/loramux');
const target = process.env.LORAMUX_TARGET;
(async () => {
  const ca = fs.readFileSync(process.env.LORAMUX_CA);
  const secure = new LoramuxClient(target, { credentials: grpc.credentials.createSsl(ca) });
  console.log('health', await secure.check('loramux.v1.GenerationService'));
  const { text } = await secure.generateText({ text: 'Prove', stopping: { max_new_tokens: 2, ignore_eos: true } });
  console.log('generated', text.length > 0);
  const plain = new LoramuxClient(target);
  await plain.check('', { deadlineMs: 3000 }).catch((e) => console.log('plaintext', grpc.status[e.code]));
})().catch((e) => { console.error(e); process.exit(1); });
"""


def test_node_client_over_tls(make_server, adapter_dirs, pki):
    from loramux.service.config import NetworkConfig, TlsFiles

    node = node_or_skip()
    tls = TlsFiles(cert=pki / "server.pem", key=pki / "server.key")
    server: Harness = make_server(adapters={"math": adapter_dirs["math"]}, network=NetworkConfig(port=0, tls=tls))
    env = {"LORAMUX_TARGET": server.target, "LORAMUX_CA": str(pki / "ca.pem")}
    result = run_node(node, "-e", NODE_TLS_SCRIPT, env=env)
    assert result.returncode == 0, f"node failed:\n{result.stdout}\n{result.stderr}"
    assert result.stdout.splitlines() == ["health SERVING", "generated true", "plaintext UNAVAILABLE"]


def test_node_example_loads_lists_sets_and_streams(make_server, adapter_dirs):
    node = node_or_skip()
    server: Harness = make_server(adapters={"math": adapter_dirs["math"]})
    load = f"--load=example={adapter_dirs['poet']}"
    result = run_node(node, "example.js", f"--target={server.target}", load, f"--prompt={PROMPT}", "--max-new-tokens=4")
    assert result.returncode == 0, f"example.js failed:\n{result.stdout}\n{result.stderr}"
    out = result.stdout
    assert "health: SERVING" in out and "loaded example (rank 8" in out
    assert "adapter example:" in out and "adapter math:" in out and "default is now: example" in out
    assert "finished: FINISH_REASON_" in out and "adapter example," in out


def test_vendored_protos_match_what_the_server_speaks(tmp_path: Path):
    """clients/node/third_party holds upstream copies of health.proto and google/rpc: same messages, enums and
    services as the Python modules the server uses (grpcio-health-checking, googleapis-common-protos)."""
    from grpc_tools import protoc

    out = tmp_path / "vendored.binpb"
    names = ["grpc/health/v1/health.proto", "google/rpc/status.proto", "google/rpc/error_details.proto"]
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    assert protoc.main(["protoc", f"-I{THIRD_PARTY}", f"-I{well_known}", f"--descriptor_set_out={out}", *names]) == 0
    vendored = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file}
    for name, module in zip(names, (health_pb2, status_pb2, error_details_pb2), strict=True):
        ours = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        theirs = vendored[name]
        assert theirs.package == ours.package, name
        for part in ("message_type", "enum_type", "service"):
            assert _shape(getattr(theirs, part)) == _shape(getattr(ours, part)), f"{name}: {part} differ"


def _shape(items) -> dict[str, bytes]:
    """Definitions by name, without options and json names (protoc fills those in differently per copy)."""
    shaped = {}
    for item in items:
        copy = type(item)()
        copy.CopyFrom(item)
        _strip(copy)
        shaped[item.name] = copy.SerializeToString(deterministic=True)
    return shaped


def _strip(message) -> None:
    """Clear options and json names, everywhere; put repeated definitions (fields, methods...) in one order."""
    for field, value in message.ListFields():
        if field.name in ("options", "json_name"):
            message.ClearField(field.name)
        elif field.message_type is not None and field.is_repeated:
            for child in value:
                _strip(child)
            ordered = sorted(value, key=lambda m: m.SerializeToString(deterministic=True))
            del value[:]
            value.extend(ordered)
        elif field.message_type is not None:
            _strip(value)
