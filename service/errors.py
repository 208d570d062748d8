"""The edge's own typed failures (the core's are in loramux.core.errors); status.py maps both to gRPC codes.

No grpc here: the runtime and the auth check raise these without depending on the transport.
"""

from __future__ import annotations

from loramux.core.errors import LoramuxError


class ModelLoadingError(LoramuxError):
    """The base model is still loading; the service is NOT_SERVING until it is ready."""

    reason = "MODEL_LOADING"


class UnauthenticatedError(LoramuxError):
    """No usable bearer token: the metadata is missing, malformed, or names no configured token."""

    reason = "UNAUTHENTICATED"


class PermissionDeniedError(LoramuxError):
    """A valid token whose role does not allow the method."""

    reason = "PERMISSION_DENIED"


class AdapterMetadataMismatchError(LoramuxError):
    """The ``x-loramux-adapter`` metadata (what a load balancer routes on) names another adapter than the
    request's body: the call would have been routed for one adapter and served with another."""

    reason = "ADAPTER_METADATA_MISMATCH"
