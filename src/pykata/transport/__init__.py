"""Transports: the sockets behind every address form the Kata agent, runtime
and agent-ctl use. They carry bytes and know no protocol.

    vsock://CID:PORT     vsock.py     AF_VSOCK; CID -1 means any (listen)
    unix:///PATH         unix.py      filesystem unix socket, owner-only
    unix://@NAME         unix.py      abstract unix socket; peers admitted by uid
    hvsock:///PATH:PORT  hvsock.py    hybrid vsock: a VMM's unix socket and its
                                      CONNECT handshake; listening binds PATH_PORT
    serial://NAME        serial.py    (pykata extension, in a guest) a virtio-serial
                                      port; one host client at a time

address.py parses them (AddressError); failures to reach or serve one are
TransportError. This face chooses the module for an address: listen(),
connect(), connect_blocking().
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable
from typing import TypeVar

from . import hvsock, serial, unix, vsock
from .address import (
    FORMS,
    AbstractAddress,
    Address,
    HybridVsockAddress,
    SerialAddress,
    UnixAddress,
    VsockAddress,
    as_address,
    parse_address,
)
from .errors import AddressError, TransportError
from .listener import Listener, Serving
from .peer import Peer, peer_of
from .serial import Boundaries
from .unix import peer_credentials

#: The protocol a connection is made with.
P = TypeVar("P", bound=asyncio.BaseProtocol)

__all__ = [
    "FORMS",
    "AbstractAddress",
    "Address",
    "AddressError",
    "Boundaries",
    "HybridVsockAddress",
    "Listener",
    "Peer",
    "SerialAddress",
    "Serving",
    "TransportError",
    "UnixAddress",
    "VsockAddress",
    "as_address",
    "connect",
    "connect_blocking",
    "listen",
    "parse_address",
    "peer_credentials",
    "peer_of",
]


# --- listening ----------------------------------------------------------------


def _bound_socket(
    address: VsockAddress | UnixAddress | AbstractAddress | HybridVsockAddress,
) -> socket.socket:
    if isinstance(address, VsockAddress):
        return vsock.bound_socket(address)
    if isinstance(address, HybridVsockAddress):
        return hvsock.bound_socket(address)
    return unix.bound_socket(address)


def _listener(address: Address, server: Serving) -> Listener:
    if isinstance(address, AbstractAddress):
        # No file, so no permissions: admit only our own uid and root.
        return Listener(address, server, admit=unix.admits_user(os.geteuid()))
    if isinstance(address, UnixAddress):
        return Listener(address, server, socket_file=unix.SocketFile(address.path))
    if isinstance(address, HybridVsockAddress):
        return Listener(address, server, socket_file=unix.SocketFile(address.listen_path))
    return Listener(address, server)


async def listen(
    address: str | Address,
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    *,
    backlog: int = 128,
    boundaries: Callable[[], Boundaries] | None = None,
    start_serving: bool = True,
) -> Listener:
    """Serve `address`. `boundaries`: for a serial port, which has no connections,
    makes the finder that tells one client from the next in the bytes (the
    protocol's to know); other transports have connections and do not use it.
    `start_serving=False`: bound (or opened) now, clients taken only after
    `Listener.start_serving()` - all the set-up done ahead, nothing served yet."""
    address = as_address(address)
    if isinstance(address, SerialAddress):
        try:
            port = serial.PortServer(address, protocol_factory, boundaries=boundaries)
            if not start_serving:
                await port.prepare()
        except OSError as exc:
            raise TransportError(f"cannot serve on {address}: {exc}") from exc
        if start_serving:
            await port.start_serving()
        return _listener(address, port)
    loop = asyncio.get_running_loop()
    try:
        sock = _bound_socket(address)
    except TransportError:
        raise
    except OSError as exc:
        raise TransportError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
    try:
        server = await loop.create_server(
            protocol_factory, sock=sock, backlog=backlog, start_serving=start_serving
        )
    except BaseException:
        sock.close()
        raise
    return _listener(address, server)


# --- connecting ---------------------------------------------------------------


def _client_socket(address: Address) -> tuple[socket.socket, tuple[int, int] | str]:
    if isinstance(address, SerialAddress):
        raise TransportError(f"{address} is a guest's port: serve on it, or open it for writing")
    if isinstance(address, VsockAddress):
        return vsock.client_socket(address)
    if isinstance(address, HybridVsockAddress):
        return hvsock.client_socket(address)
    return unix.client_socket(address)


async def connect(
    address: str | Address,
    protocol_factory: Callable[[], P],
    *,
    timeout: float | None = None,
) -> tuple[asyncio.Transport, P]:
    address = as_address(address)
    loop = asyncio.get_running_loop()
    sock, target = _client_socket(address)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, target)
            if isinstance(address, HybridVsockAddress):
                await hvsock.handshake(sock, address)
        return await loop.create_connection(protocol_factory, sock=sock)
    except TimeoutError:
        sock.close()
        raise TransportError(f"cannot connect to {address}: timed out after {timeout}s") from None
    except TransportError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        raise TransportError(f"cannot connect to {address}: {reason}") from exc


def connect_blocking(address: str | Address, *, timeout: float | None = 10.0) -> socket.socket:
    """A connected blocking socket, for callers outside the event loop (span export)."""
    address = as_address(address)
    sock, target = _client_socket(address)
    sock.settimeout(timeout)
    try:
        sock.connect(target)
        if isinstance(address, HybridVsockAddress):
            hvsock.handshake_blocking(sock, address)
    except TransportError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise TransportError(f"cannot connect to {address}: {reason}") from exc
    return sock
