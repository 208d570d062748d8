"""Fixtures of the polyglot tests: real servers on free ports (tests/service/harness.py)."""

from tests.service.harness import adapter_dirs, base_model, make_server, model_dir, server, tokenizer

__all__ = ["adapter_dirs", "base_model", "make_server", "model_dir", "server", "tokenizer"]
