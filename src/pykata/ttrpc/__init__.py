"""ttRPC for asyncio: framing, a server and a client, usable outside Kata.

frame     the 10-byte header format, sans-IO
protocol  per-connection state machines (bytes in, events out), sans-IO
status    Code and TtrpcError
server    Server, Service, ServerContext
client    Client, ClientStream
testing   a service and a client wired together in-process
"""

from .client import Client, ClientStream, Stub
from .server import Server, ServerContext, ServerStream, Service, StreamMethod, UnaryMethod
from .status import Code, TtrpcError

__all__ = [
    "Client",
    "ClientStream",
    "Code",
    "Server",
    "ServerContext",
    "ServerStream",
    "Service",
    "StreamMethod",
    "Stub",
    "TtrpcError",
    "UnaryMethod",
]
