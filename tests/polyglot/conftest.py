"""Fixtures of the polyglot tests: real servers on free ports (tests/service/harness.py)."""

from tests.service.harness import make_server, model_dir, server
from tests.service.pki import pki

__all__ = ["make_server", "model_dir", "pki", "server"]
