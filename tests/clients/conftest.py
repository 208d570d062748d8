"""The real in-process server fixtures of tests/service (harness.py), for the client and CLI tests."""

from tests.service.harness import adapter_dirs, base_model, make_server, server, tokenizer

__all__ = ["adapter_dirs", "base_model", "make_server", "server", "tokenizer"]
