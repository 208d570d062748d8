"""Fixtures of the service tests (defined in harness.py, shared with tests/clients and tests/polyglot); the
tiny model, tokenizer and adapters come from tests/generation_fixtures.py for every test directory."""

from tests.service.harness import make_server, model_dir, server
from tests.service.pki import pki

__all__ = ["make_server", "model_dir", "pki", "server"]
