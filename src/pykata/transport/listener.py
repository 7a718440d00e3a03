"""A listening endpoint of any transport, and what closing it cleans up."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from .address import Address
from .unix import SocketFile


class Serving(Protocol):
    """What a listener starts and stops: an asyncio.Server, or a virtio-serial port server."""

    async def start_serving(self) -> None: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class Listener:
    """Serves connections on `address` until closed.

    `socket_file`: the file to remove on close (unix paths, hybrid vsock).
    `admit`: decides whether a new connection's peer may stay (abstract
    sockets, which have no file permissions); without it everyone is admitted.
    """

    def __init__(
        self,
        address: Address,
        server: Serving,
        *,
        socket_file: SocketFile | None = None,
        admit: Callable[[asyncio.BaseTransport], bool] | None = None,
    ) -> None:
        self.address = address
        self._server = server
        self._socket_file = socket_file
        self._admit = admit

    def admits(self, transport: asyncio.BaseTransport) -> bool:
        return self._admit is None or self._admit(transport)

    async def start_serving(self) -> None:
        """Begin taking clients, if listen() was told not to yet (a no-op otherwise)."""
        await self._server.start_serving()

    def close(self) -> None:
        """Stop accepting; the socket file goes with it."""
        self._server.close()
        if self._socket_file is not None:
            self._socket_file.remove()
            self._socket_file = None

    async def wait_closed(self) -> None:
        await self._server.wait_closed()
