"""What an adapter may be called: the one rule for names, shared by the manager, the engine and the edge.

A name is one or more segments joined by '/' (``tenant-7/support``, ``owner/repo``), at most 256 characters.
Each segment is 1-128 letters, digits, '_', '.', ':' or '-' and does not start with '.', ':' or '-', so a name
is never absolute, never empty between slashes and has no '.' or '..' segment: under an adapter root, a name
is a relative path that stays inside it (symlinks aside, which load on demand resolves and checks).
"""

from __future__ import annotations

import re

from loramux.core.errors import InvalidArgumentError

MAX_NAME_CHARS = 256
_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,127}"
_NAME = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")


def validate_adapter_name(name: str, *, field: str = "name") -> str:
    """``name`` if it follows the rule above, else InvalidArgumentError naming ``field``."""
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or not _NAME.fullmatch(name):
        raise InvalidArgumentError(
            f"adapter name {name!r} must be at most {MAX_NAME_CHARS} characters of '/'-separated segments, each"
            " 1-128 letters, digits, '_', '.', ':' or '-' not starting with '.', ':' or '-'",
            field=field,
        )
    return name
