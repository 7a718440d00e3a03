"""ttRPC for asyncio: framing, a server and a client, usable outside Kata.

frame        the 10-byte header format, sans-IO
protocol     per-connection state machines (bytes in, events out), sans-IO
status       Code and TtrpcError
server       Server, Service, LazyService, ServerContext
client       Client, ClientStream, ClientContext
interceptor  chains of interceptors around calls, on either side
testing      a service and a client wired together in-process
boundaries   where a new client starts on a stream clients share in turn (a serial port),
             sans-IO; the server hands it to the transport
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The names load their module on first use (PEP 562): a module that only needs
# the status codes - the agent's domain errors - does not load the server,
# the client and the transports with them.
_HOMES = {
    **dict.fromkeys(
        ["Client", "ClientContext", "ClientStream", "Invoker", "Stub", "UnaryClientInterceptor"],
        "client",
    ),
    **dict.fromkeys(
        [
            "EncodedResponse",
            "LazyService",
            "Server",
            "ServerContext",
            "ServerStream",
            "Service",
            "StreamHandler",
            "StreamMethod",
            "StreamServerInterceptor",
            "UnaryHandler",
            "UnaryMethod",
            "UnaryResponse",
            "UnaryServerInterceptor",
        ],
        "server",
    ),
    **dict.fromkeys(["Code", "TtrpcError"], "status"),
}

if TYPE_CHECKING:
    from .client import Client, ClientContext, ClientStream, Invoker, Stub, UnaryClientInterceptor
    from .server import (
        EncodedResponse,
        LazyService,
        Server,
        ServerContext,
        ServerStream,
        Service,
        StreamHandler,
        StreamMethod,
        StreamServerInterceptor,
        UnaryHandler,
        UnaryMethod,
        UnaryResponse,
        UnaryServerInterceptor,
    )
    from .status import Code, TtrpcError


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


__all__ = [
    "Client",
    "ClientContext",
    "ClientStream",
    "Code",
    "EncodedResponse",
    "Invoker",
    "LazyService",
    "Server",
    "ServerContext",
    "ServerStream",
    "Service",
    "StreamHandler",
    "StreamMethod",
    "StreamServerInterceptor",
    "Stub",
    "TtrpcError",
    "UnaryClientInterceptor",
    "UnaryHandler",
    "UnaryMethod",
    "UnaryResponse",
    "UnaryServerInterceptor",
]
