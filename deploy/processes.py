"""The local cluster's child processes: loramux replicas and HAProxy, started, watched and stopped.

Each child runs in a session of its own (a Ctrl-C at the terminal reaches the cluster alone, which then stops
the children in order: replicas drain first, HAProxy last) and, on Linux, with a parent-death signal: if the
cluster process itself is killed, its children get SIGTERM instead of living on as orphans. The signal is set
by a two-line launcher that then execs the real program (no preexec_fn: it is unsafe in threaded parents).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

# PR_SET_PDEATHSIG (1) survives execve; then check that the parent did not die before it was set.
_LAUNCHER = (
    "import ctypes,os,sys\n"
    "ctypes.CDLL(None).prctl(1, 15) if sys.platform == 'linux' else None\n"
    "os.kill(os.getpid(), 15) if os.getppid() != int(sys.argv[1]) else os.execvp(sys.argv[2], sys.argv[2:])\n"
)
HAPROXY_HINT = "install it: apt-get install haproxy (Debian/Ubuntu), dnf install haproxy, brew install haproxy"


class ProcessError(RuntimeError):
    """A child did not start, or ended before it was ready."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's pick); the caller binds it soon after."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_haproxy(path: str | None = None) -> str | None:
    """``path``, else `haproxy` on PATH, else Debian's /usr/sbin/haproxy (not on a non-root PATH)."""
    if path is not None:
        return path if shutil.which(path) else None
    found = shutil.which("haproxy")
    if found is None and os.access("/usr/sbin/haproxy", os.X_OK):
        found = "/usr/sbin/haproxy"
    return found


def haproxy_version(binary: str) -> str:
    """e.g. "2.6.12-1+deb12u3"."""
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False).stdout
    match = re.search(r"version (\S+)", out)
    return match.group(1) if match else "unknown"


def check_config(binary: str, config: Path) -> None:
    """``haproxy -c``: raises ProcessError with HAProxy's own words when it refuses the file."""
    done = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise ProcessError(f"haproxy refused {config}:\n{done.stdout}{done.stderr}")


class Child:
    """One child process; its stdout lines are read on a thread and matched against what callers wait for."""

    def __init__(
        self, name: str, argv: Sequence[str], *, log: IO[str] | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        """Start ``argv``; stderr goes to ``log`` (None: ours); ``env`` is added to our environment."""
        self.name = name
        self.lines: list[str] = []
        self._changed = threading.Condition()
        cmd = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *argv]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
            bufsize=1,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:  # EOF: the process is gone (or closed stdout); wake the waiters
            self.proc.wait()
            self._changed.notify_all()

    def wait_for_line(self, pattern: str, *, timeout: float) -> re.Match[str]:
        """The first stdout line matching ``pattern``; ProcessError if the child ends first or ``timeout`` passes."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                if not self.alive:
                    raise ProcessError(f"{self.name} exited with status {self.proc.returncode} before {pattern!r}")
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._changed.wait(remaining):
                    raise ProcessError(f"{self.name}: no {pattern!r} within {timeout:g} s")

    def send(self, sig: signal.Signals) -> None:
        if self.alive:
            self.proc.send_signal(sig)

    def stop(self, *, timeout: float, sig: signal.Signals = signal.SIGTERM) -> int:
        """Signal, wait up to ``timeout`` seconds, then SIGKILL; the exit status."""
        self.send(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
