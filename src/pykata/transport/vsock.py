"""AF_VSOCK, the guest <-> host socket family; CID -1 means any (VMADDR_CID_ANY)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from .address import VsockAddress


def _cid(address: VsockAddress) -> int:
    return socket.VMADDR_CID_ANY if address.cid == -1 else address.cid


def bound_socket(address: VsockAddress) -> socket.socket:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.bind((_cid(address), address.port))
    except OSError:
        sock.close()
        raise
    return sock


def client_socket(address: VsockAddress) -> tuple[socket.socket, tuple[int, int]]:
    """A socket to connect, and where to."""
    return socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM), (_cid(address), address.port)


def peer_address(transport: asyncio.BaseTransport) -> tuple[int, int] | None:
    """(CID, port) of a vsock peer; None for other sockets."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != getattr(socket, "AF_VSOCK", None):
        return None
    with contextlib.suppress(OSError):
        cid, port = sock.getpeername()
        return cid, port
    return None
