"""What an adapter may be called: the one rule for names, shared by the manager, the engine and the edge."""

from __future__ import annotations

import re

from loramux.core.errors import InvalidArgumentError

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,127}")


def validate_adapter_name(name: str, *, field: str = "name") -> str:
    """``name`` if it is 1-128 letters, digits, '_', '.', ':' or '-', not starting with '.', ':' or '-'."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgumentError(
            f"adapter name {name!r} must be 1-128 characters of letters, digits, '_', '.', ':' or '-'"
            " and not start with '.', ':' or '-'",
            field=field,
        )
    return name
