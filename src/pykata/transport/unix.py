"""Unix sockets: filesystem paths and abstract names, and who the peer is.

A path socket is owner-only (0600) from the moment its file exists; a file
that a dead process left is replaced, a live socket or anything that is not
a socket is refused, and closing removes the file only if it is still ours.
An abstract socket has no file and so no permissions: peers are admitted by
their credentials (SO_PEERCRED) instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import struct
from collections.abc import Callable

from .address import AbstractAddress, UnixAddress
from .errors import TransportError


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead process; refuse to touch anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise TransportError(f"cannot listen on unix://{path}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        return
    finally:
        probe.close()
    raise TransportError(f"cannot listen on unix://{path}: another process is listening there")


def bind_path(path: str) -> socket.socket:
    """A socket bound to the file `path`, which only our user may connect to."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _remove_stale_socket(path)
        # Owner-only from the moment the file exists: no window where others may connect.
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        return sock
    except BaseException:
        sock.close()
        raise


def bound_socket(address: UnixAddress | AbstractAddress) -> socket.socket:
    if isinstance(address, UnixAddress):
        return bind_path(address.path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("\0" + address.name)
    except BaseException:
        sock.close()
        raise
    return sock


def client_socket(address: UnixAddress | AbstractAddress) -> tuple[socket.socket, str]:
    """A socket to connect, and where to."""
    target = address.path if isinstance(address, UnixAddress) else "\0" + address.name
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), target


class SocketFile:
    """A listening socket's file; removed on close unless another process's took its place."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._inode = os.stat(path).st_ino

    def remove(self) -> None:
        # OSError too: after dropping privileges the directory may be out of reach.
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)


def peer_credentials(transport: asyncio.BaseTransport) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a unix socket peer; None for other sockets."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def admits_user(uid: int) -> Callable[[asyncio.BaseTransport], bool]:
    """Admission for an abstract socket: peers running as `uid`, or as root."""

    def admits(transport: asyncio.BaseTransport) -> bool:
        creds = peer_credentials(transport)
        return creds is not None and creds[1] in (0, uid)

    return admits
