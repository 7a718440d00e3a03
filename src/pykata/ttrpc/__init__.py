"""ttRPC for asyncio: framing, a server and a client, usable outside Kata.

frame        the 10-byte header format, sans-IO
protocol     per-connection state machines (bytes in, events out), sans-IO
status       Code and TtrpcError
server       Server, Service, ServerContext
client       Client, ClientStream, ClientContext
interceptor  chains of interceptors around calls, on either side
testing      a service and a client wired together in-process
boundaries   where a new client starts on a stream clients share in turn (a serial port),
             sans-IO; the server hands it to the transport
"""

from .client import Client, ClientContext, ClientStream, Invoker, Stub, UnaryClientInterceptor
from .server import (
    Server,
    ServerContext,
    ServerStream,
    Service,
    StreamHandler,
    StreamMethod,
    StreamServerInterceptor,
    UnaryHandler,
    UnaryMethod,
    UnaryServerInterceptor,
)
from .status import Code, TtrpcError

__all__ = [
    "Client",
    "ClientContext",
    "ClientStream",
    "Code",
    "Invoker",
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
    "UnaryServerInterceptor",
]
