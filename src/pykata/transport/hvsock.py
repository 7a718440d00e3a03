"""Hybrid vsock (Firecracker, Cloud Hypervisor): a guest's vsock behind a VMM's unix socket.

Host -> guest: connect to the VMM's socket PATH, send "CONNECT PORT\\n", and
after the answer "OK N\\n" the stream is the guest's connection. Guest -> host:
the VMM connects to the unix socket PATH_PORT, so listening binds that file.
"""

from __future__ import annotations

import asyncio
import re
import socket

from . import unix
from .address import HybridVsockAddress
from .errors import TransportError

#: The longest reply a VMM gives to CONNECT ("OK <u32>\n" with room to spare).
_HANDSHAKE_LIMIT = 64


def bound_socket(address: HybridVsockAddress) -> socket.socket:
    return unix.bind_path(address.listen_path)


def client_socket(address: HybridVsockAddress) -> tuple[socket.socket, str]:
    """A socket to connect to the VMM, and where; then `handshake`."""
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), address.uds_path


async def handshake(sock: socket.socket, address: HybridVsockAddress) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, _connect_line(address))
    reply = bytearray()
    # One byte at a time: nothing after the newline belongs to the handshake.
    while not reply.endswith(b"\n"):
        chunk = await loop.sock_recv(sock, 1)
        if not chunk or len(reply) >= _HANDSHAKE_LIMIT:
            break
        reply += chunk
    _check_reply(address, reply)


def handshake_blocking(sock: socket.socket, address: HybridVsockAddress) -> None:
    sock.sendall(_connect_line(address))
    reply = bytearray()
    while not reply.endswith(b"\n") and len(reply) < _HANDSHAKE_LIMIT:
        chunk = sock.recv(1)
        if not chunk:
            break
        reply += chunk
    _check_reply(address, reply)


def _connect_line(address: HybridVsockAddress) -> bytes:
    return f"CONNECT {address.port}\n".encode()


def _check_reply(address: HybridVsockAddress, reply: bytes | bytearray) -> None:
    line = reply.decode("ascii", "replace").strip()
    if not re.fullmatch(r"OK \d+", line):
        got = repr(line) if reply else "connection closed"
        raise TransportError(
            f"hybrid vsock handshake with {address.uds_path} for port {address.port} failed: "
            f"expected 'OK <port>', got {got}"
        )
