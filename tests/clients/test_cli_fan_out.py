"""The CLI applies adapter admin RPCs to every replica (loramux.client.targets): --target lists and dns:///."""

from __future__ import annotations

import io
import socket

import pytest

from loramux.client import targets
from loramux.client.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["--timeout", "30", *args], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def fake_resolver(table: dict[str, list[str]]):
    def resolve(host: str, port: int, **_) -> list[tuple]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        family = {False: socket.AF_INET, True: socket.AF_INET6}
        return [(family[":" in a], socket.SOCK_STREAM, 6, "", (a, port)) for a in table[host]]

    return resolve


def test_expand_lists_and_dns_names():
    resolve = fake_resolver({"replicas.svc": ["10.0.0.6", "10.0.0.5", "10.0.0.6", "fd00::7"]})
    assert targets.expand(["a:1,b:2", "a:1", "dns:///replicas.svc:50051"], resolve=resolve) == [
        "a:1",
        "b:2",
        "10.0.0.5:50051",
        "10.0.0.6:50051",
        "[fd00::7]:50051",
    ]
    for bad in ("a:1,,b:2", "dns:///replicas.svc", "dns:///nowhere.svc:1"):
        with pytest.raises(targets.TargetError):
            targets.expand([bad], resolve=resolve)


def test_admin_commands_run_on_every_replica(make_server, adapter_dirs):
    one, two = make_server(adapters={"math": adapter_dirs["math"]}), make_server(adapters={})
    both = f"{one.target},{two.target}"
    code, out, err = cli("--target", both, "adapters", "load", "poet", str(adapter_dirs["poet"]))
    assert code == 0, err
    assert out == f"== {one.target}\nloaded: poet (rank 8, v1)\n== {two.target}\nloaded: poet (rank 8, v1)\n"
    assert err == "2 of 2 replicas succeeded\n"
    code, out, _ = cli("--target", one.target, "--target", two.target, "adapters", "set", "poet")
    assert code == 0 and out.count("default adapter: poet (was (base model))") == 2
    for server in (one, two):
        assert server.engine.manager.default_adapter == "poet"
    code, out, _ = cli("--target", both, "health")
    assert code == 0 and out.count("SERVING\n") == 2


def test_a_failing_replica_is_reported_and_fails_the_command(make_server, adapter_dirs):
    one, two = make_server(adapters={"math": adapter_dirs["math"]}), make_server(adapters={})
    code, out, err = cli("--target", f"{one.target},{two.target}", "adapters", "unload", "math")
    assert code == 1
    assert out == f"== {one.target}\nunloaded: math\n== {two.target} (failed)\n"
    assert f"{two.target}: error: NOT_FOUND ADAPTER_NOT_FOUND: " in err
    assert err.endswith(f"1 of 2 replicas succeeded; failed: {two.target}\n")
    assert "math" not in [a.name for a in one.engine.manager.list_adapters()]


def test_dns_target_and_single_target_commands(server):
    port = server.target.rsplit(":", 1)[1]
    code, out, _ = cli("--target", f"dns:///127.0.0.1:{port}", "adapters", "get", "math")
    assert code == 0 and 'name: "math"' in out and "==" not in out  # one address: as a plain --target
    code, _, err = cli("--target", f"{server.target},{server.target}x", "generate", "hi")
    assert code == 2 and "generate goes to one server" in err
    code, _, err = cli("--target", "dns:///127.0.0.1", "health")
    assert code == 2 and "expected dns:///HOST:PORT" in err
