"""The real in-process server fixtures of tests/service (harness.py), for the installed client's tests."""

from tests.service.harness import make_server, server

__all__ = ["make_server", "server"]
