"""Bearer-token authorization for the loramux services (off unless ``--auth-tokens-file`` is given).

Each token has a role. ``generate`` may call Generate and Tokenize and read adapters (ListAdapters,
GetAdapter); ``admin`` may call everything, including the calls that change what the server holds
(LoadAdapter, UnloadAdapter, SetAdapter). Clients send ``authorization: Bearer <token>`` metadata. Health
and reflection are separate services and need none, so probes and grpcurl keep working.

The check runs inside the rpc.unary/streaming wrappers, so a refused call gets the same request id,
rich status, access-log line and metrics as any other: UNAUTHENTICATED for a missing or unknown token,
PERMISSION_DENIED for a known token whose role does not cover the method. Tokens are compared in constant
time and never logged.

Token file: one ``ROLE TOKEN`` per line; blank lines and lines starting with ``#`` are ignored.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from loramux.service.errors import PermissionDeniedError, UnauthenticatedError

AUTHORIZATION_KEY = "authorization"


class Role(enum.Enum):
    GENERATE = "generate"
    ADMIN = "admin"


GENERATE_METHODS = frozenset({"Generate", "Tokenize", "ListAdapters", "GetAdapter"})  # what a generate token may call


@dataclass(frozen=True)
class BearerTokens:
    """The configured tokens and their roles. repr never shows a token."""

    roles: tuple[tuple[str, Role], ...] = field(repr=False)

    def __post_init__(self) -> None:
        if not self.roles:
            raise ValueError("at least one token is needed to require authorization")

    def check(self, method: str, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        """Raise UnauthenticatedError or PermissionDeniedError unless the call's token allows ``method``."""
        role = self._role_of(_bearer(metadata))
        if role is Role.ADMIN or (role is Role.GENERATE and method in GENERATE_METHODS):
            return
        raise PermissionDeniedError(
            f"this token's role ({role.value}) may not call {method}", metadata={"method": method}
        )

    def _role_of(self, token: str) -> Role:
        found: Role | None = None
        for known, role in self.roles:  # every comparison, in constant time: no early exit to time
            if hmac.compare_digest(known.encode(), token.encode()):
                found = role
        if found is None:
            raise UnauthenticatedError("the bearer token is not valid")
        return found


def _bearer(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    values = [v for k, v in metadata if k == AUTHORIZATION_KEY and isinstance(v, str)]
    if not values:
        raise UnauthenticatedError(f"this server requires `{AUTHORIZATION_KEY}: Bearer <token>` metadata")
    scheme, _, token = values[0].partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthenticatedError(f"`{AUTHORIZATION_KEY}` metadata must be `Bearer <token>`")
    return token.strip()


def parse_tokens(text: str, *, source: str = "token file") -> BearerTokens:
    """``ROLE TOKEN`` lines -> BearerTokens; a bad line is a ValueError naming its number (never the token)."""
    roles: dict[str, Role] = {}
    valid = ", ".join(r.value for r in Role)
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        parts = stripped.split()
        if len(parts) != 2:
            raise ValueError(f"{source} line {number}: expected `ROLE TOKEN` (role one of {valid})")
        role_name, token = parts
        try:
            role = Role(role_name)
        except ValueError:
            raise ValueError(f"{source} line {number}: unknown role {role_name!r} (one of {valid})") from None
        if token in roles:
            raise ValueError(f"{source} line {number}: this token is listed twice")
        roles[token] = role
    if not roles:
        raise ValueError(f"{source} lists no tokens")
    return BearerTokens(roles=tuple(roles.items()))


def load_tokens(path: Path) -> BearerTokens:
    return parse_tokens(path.read_text(encoding="utf-8"), source=str(path))


def token_roles(tokens: BearerTokens) -> Mapping[Role, int]:
    """How many tokens each role has (for the start-up log line; never the tokens)."""
    counts = dict.fromkeys(Role, 0)
    for _, role in tokens.roles:
        counts[role] += 1
    return counts
