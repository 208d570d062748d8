"""The loramux client: typed sync and asyncio clients over the generated stubs (loramux.v1), and the CLI.

    from loramux.client import AsyncLoramuxClient, LoramuxClient, LoramuxRpcError

Installed by the ``loramux-client`` distribution (clients/), which needs neither torch nor the server.
"""

from loramux.client.aio import AsyncLoramuxClient
from loramux.client.errors import LoramuxRpcError
from loramux.client.events import Completion, GenerateEvent, TextChunk
from loramux.client.messages import DEFAULT_TARGET, GenerateOptions, LoadOptions
from loramux.client.sync import LoramuxClient

__all__ = [
    "DEFAULT_TARGET",
    "AsyncLoramuxClient",
    "Completion",
    "GenerateEvent",
    "GenerateOptions",
    "LoadOptions",
    "LoramuxClient",
    "LoramuxRpcError",
    "TextChunk",
]
