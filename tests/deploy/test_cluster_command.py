"""`python -m loramux.deploy.cluster` as a user runs it: prints the address, serves, stops everything on SIGTERM,
leaves no process behind even when killed itself, and says how to install HAProxy when it is missing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from loramux.client import LoramuxClient
from loramux.client.events import Completion
from loramux.deploy.cluster import EX_UNAVAILABLE
from loramux.deploy.processes import Child
from tests.deploy.conftest import haproxy_or_skip
from tests.service.harness import wait_until

COMMAND = [sys.executable, "-m", "loramux.deploy.cluster"]


def gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaped yet (it runs nothing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_without_haproxy_it_says_how_to_install_it():
    done = subprocess.run(
        [*COMMAND, "--haproxy", "/nonexistent/haproxy", "--replicas", "1"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == EX_UNAVAILABLE == 69
    assert "HAProxy is needed" in done.stderr and "apt-get install haproxy" in done.stderr


def test_flags_the_cluster_sets_itself_are_refused():
    done = subprocess.run([*COMMAND, "--replica-id", "x"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "the cluster sets" in done.stderr


def start(tmp_path: Path) -> tuple[Child, str, list[int]]:
    """The command with one replica: (its process, the address it printed, its children's pids)."""
    argv = [*COMMAND, "--replicas", "1", "--port", "0", "--log-dir", str(tmp_path), "--grace-period", "2"]
    cluster = Child("cluster", argv)
    replica = cluster.wait_for_line(r"^loramux replica replica-1 on \S+ \(pid (\d+),", timeout=120)
    ready = cluster.wait_for_line(r"^loramux cluster on (\S+) \(HAProxy [^,]+, pid (\d+); 1 replicas\)$", timeout=60)
    return cluster, ready.group(1), [int(replica.group(1)), int(ready.group(2))]


def test_serves_then_stops_everything_on_sigterm(tmp_path):
    haproxy_or_skip()
    cluster, address, children = start(tmp_path)
    try:
        with LoramuxClient(address, timeout=30) as client:
            done = list(client.generate_events("Return the", adapter="upper", max_new_tokens=4))[-1]
        assert isinstance(done, Completion) and done.adapter == "upper" and done.replica == "replica-1"
        cluster.send(signal.SIGTERM)
        assert cluster.proc.wait(60) == 0
        assert cluster.lines[-1] == "loramux cluster stopped"
        assert all(gone(pid) for pid in children), children
        assert re.search(r"rpc=Generate .*status=OK adapter=upper", (tmp_path / "replica-1.log").read_text())
    finally:
        cluster.stop(timeout=30)


def test_killed_itself_its_children_stop_too(tmp_path):
    haproxy_or_skip()
    cluster, _, children = start(tmp_path)
    try:
        cluster.send(signal.SIGKILL)  # no finally runs: the children's parent-death signal stops them
        cluster.proc.wait(10)
        wait_until(lambda: all(gone(pid) for pid in children), timeout=30, what="the orphaned children to stop")
    finally:
        cluster.stop(timeout=10)
        for pid in children:  # only if the test failed: leave nothing running
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
