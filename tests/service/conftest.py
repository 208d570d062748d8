"""Fixtures of the service tests (defined in harness.py, shared with tests/clients)."""

from tests.service.harness import adapter_dirs, base_model, make_server, model_dir, server, tokenizer

__all__ = ["adapter_dirs", "base_model", "make_server", "model_dir", "server", "tokenizer"]
