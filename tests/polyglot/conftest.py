"""Fixtures of the polyglot tests: real servers on free ports (tests/service/harness.py)."""

from tests.service.harness import make_server, model_dir, server

__all__ = ["make_server", "model_dir", "server"]
