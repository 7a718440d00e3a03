"""Wire a Server to a Client in-process over a socketpair (real framing, no files)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterable

from .client import Client, UnaryClientInterceptor, _ClientProtocol
from .server import Server


@contextlib.asynccontextmanager
async def connected(
    server: Server, *, interceptors: Iterable[UnaryClientInterceptor] = ()
) -> AsyncIterator[Client]:
    """A client of `server` (with these client interceptors), closed at the end."""
    loop = asyncio.get_running_loop()
    server_sock, client_sock = socket.socketpair()
    await loop.connect_accepted_socket(server.connection_protocol, server_sock)
    client = Client(interceptors=interceptors)
    await loop.create_connection(lambda: _ClientProtocol(client), sock=client_sock)
    try:
        yield client
    finally:
        await client.close()
