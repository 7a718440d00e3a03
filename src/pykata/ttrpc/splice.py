"""Bytes from a pipe into a socket by splice(2): the kernel moves them from the
pipe's pages into the socket, and Python never holds a copy.

Everything here is non-blocking and reports what it could not do now, so
the caller can queue the rest behind the transport's buffer like any other
bytes: a frame is never left half-written, and a client that does not read
blocks nothing but its own connection.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

#: Linux's SO_SNDBUFFORCE (root may exceed net.core.wmem_max); Python does not name it.
SO_SNDBUFFORCE = 32
_FLAGS = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE


class PipeShort(Exception):
    """The pipe held fewer bytes than its reader promised (someone else read them)."""

    def __init__(self, held: int) -> None:
        super().__init__(f"the pipe held only {held} more bytes")
        self.held = held


def write_now(sock: int, data: bytes) -> int:
    """Write what of `data` the socket takes without waiting; how much that was.
    (An error counts as nothing written: the transport meets it on its next write.)"""
    try:
        return os.write(sock, data)
    except OSError:
        return 0


def splice_now(pipe: int, sock: int, size: int) -> int:
    """Move up to `size` bytes waiting in `pipe` into `sock` without waiting; how many moved."""
    moved = 0
    while moved < size:
        try:
            step = os.splice(pipe, sock, size - moved, flags=_FLAGS)
        except OSError:
            break  # the socket is full (or failed: the transport will say so)
        if not step:
            break
        moved += step
    return moved


def read_exactly(pipe: int, size: int) -> bytes:
    """`size` bytes its reader knows are waiting in `pipe` (one read takes them all)."""
    try:
        data = os.read(pipe, size)
    except BlockingIOError:
        data = b""
    if len(data) != size:
        raise PipeShort(len(data))
    return data


def send_buffer(sock: Any) -> int:
    """What the socket's send buffer holds now, as set_send_buffer() takes it."""
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)) // 2


def set_send_buffer(sock: Any, size: int) -> None:
    """Let the socket's send buffer hold `size` bytes (the kernel doubles the
    number for its bookkeeping): a whole frame then fits while the peer reads."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, size)
    except OSError:
        with contextlib.suppress(OSError):  # then as much as net.core.wmem_max allows
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
