"""AIP-158 pages over the name-ordered adapter list.

A page token encodes the last name of the previous page, so tokens never expire and survive loads and unloads
between pages: the next page starts at the first name after it. Tokens are opaque to clients (URL-safe base64
of a versioned prefix plus the name); anything else is refused as INVALID_ARGUMENT (field ``page_token``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import TypeVar

from loramux.core.adapters.names import validate_adapter_name
from loramux.core.errors import InvalidArgumentError

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_PREFIX = "loramux.v1.adapters/after:"

T = TypeVar("T")


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgumentError(f"page_size must be >= 0 (got {requested})", field="page_size")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(last_name: str) -> str:
    return base64.urlsafe_b64encode((_PREFIX + last_name).encode()).decode().rstrip("=")


def decode_token(token: str) -> str | None:
    """The name the page starts after; None for the first page."""
    if not token:
        return None
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        if not text.startswith(_PREFIX):
            raise ValueError(token)
        return validate_adapter_name(text.removeprefix(_PREFIX), field="page_token")
    except (ValueError, binascii.Error, UnicodeDecodeError, InvalidArgumentError):
        raise InvalidArgumentError(
            "page_token is not a token this server issued (pass next_page_token unchanged)", field="page_token"
        ) from None


def paginate(items: Sequence[T], names: Sequence[str], *, size: int, token: str) -> tuple[list[T], str]:
    """One page of ``items`` (sorted by ``names``) and the next page's token ("" after the last page)."""
    after = decode_token(token)
    start = 0 if after is None else next((i for i, n in enumerate(names) if n > after), len(names))
    end = start + size
    page = list(items[start:end])
    return page, encode_token(names[end - 1]) if end < len(items) else ""
