"""One HAProxy process: its rendered configuration, checked with ``haproxy -c`` first, and its server states
read from its stats socket (the local cluster has one; the benchmark starts more in front of the same replicas).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import IO

from loramux.deploy import haproxy_config as hc
from loramux.deploy.processes import Child, ProcessError, check_config

STATS_READ_S = 5.0


class Balancer:
    def __init__(
        self, binary: str, config: hc.HaproxyConfig, *, work_dir: Path, name: str = "haproxy", log_dir: Path | None
    ) -> None:
        self.binary, self.name, self.log_dir = binary, name, log_dir
        self.stats_socket = work_dir / f"{name}.sock"
        self.config = replace(config, stats_socket=str(self.stats_socket))
        self.config_path = work_dir / f"{name}.cfg"
        self.child: Child | None = None
        self._log: IO[str] | None = None

    @property
    def address(self) -> str:
        return self.config.bind

    @property
    def alive(self) -> bool:
        return self.child is not None and self.child.alive

    @property
    def pid(self) -> int:
        return self.child.pid if self.child is not None else 0

    def start(self) -> None:
        """Write and check the configuration, then run HAProxy in the foreground (-db) as a child."""
        self.config_path.write_text(hc.render(self.config))
        check_config(self.binary, self.config_path)
        if self.log_dir is not None:
            self._log = open(self.log_dir / f"{self.name}.log", "a", encoding="utf-8")
        self.child = Child(self.name, [self.binary, "-db", "-f", str(self.config_path)], log=self._log)

    def server_states(self) -> dict[str, str]:
        """Each server's state ("UP", "DOWN", "MAINT", ...): the worst over the two backends."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(STATS_READ_S)
            s.connect(str(self.stats_socket))
            s.sendall(b"show stat\n")
            raw = b"".join(iter(lambda: s.recv(65536), b""))
        states: dict[str, str] = {}
        for row in raw.decode().splitlines()[1:]:
            cols = row.split(",")
            if len(cols) > 17 and cols[1] not in ("FRONTEND", "BACKEND"):
                state = cols[17].split(" ")[0]  # "UP", "DOWN", "UP 1/2" (going down), ...
                states[cols[1]] = state if states.get(cols[1], "UP") == "UP" else states[cols[1]]
        return states

    def wait_states(self, done: Callable[[dict[str, str]], bool], *, timeout: float) -> dict[str, str]:
        """Poll the server states until ``done(states)``; ProcessError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        tick = threading.Event()
        while True:
            if self.child is not None and not self.child.alive:
                raise ProcessError(f"{self.name} exited with status {self.child.proc.returncode}")
            try:
                states = self.server_states()
            except OSError:  # no socket yet: HAProxy is still starting
                states = {}
            if done(states):
                return states
            if time.monotonic() > deadline:
                raise ProcessError(f"{self.name}: servers not as wanted within {timeout:.0f} s: {states}")
            tick.wait(0.05)

    def wait_up(self, names: Iterable[str], *, timeout: float) -> None:
        wanted = list(names)
        self.wait_states(lambda s: all(s.get(n) == "UP" for n in wanted), timeout=timeout)

    def stop(self) -> None:
        try:
            if self.child is not None:
                self.child.stop(timeout=10)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
