"""Wire a Server to a Client in-process over a socketpair (real framing, no files)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

from .client import Client, _ClientProtocol
from .server import Server


@contextlib.asynccontextmanager
async def connected(server: Server) -> AsyncIterator[Client]:
    loop = asyncio.get_running_loop()
    server_sock, client_sock = socket.socketpair()
    await loop.connect_accepted_socket(server.connection_protocol, server_sock)
    client = Client()
    await loop.create_connection(lambda: _ClientProtocol(client), sock=client_sock)
    try:
        yield client
    finally:
        await client.close()
