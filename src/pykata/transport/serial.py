"""virtio-serial ports (guest side): the agent's channel where the host has no vhost-vsock.

This is a pykata extension. QEMU gives the guest a named port
(`-device virtserialport,name=agent.channel.0,chardev=...`) and exposes it on
the host as a unix socket (`-chardev socket,server=on,...`); the guest sees
/dev/vportNpM, whose name is in /sys/class/virtio-ports/vportNpM/name.

A port is one byte stream with no connections. The host's client comes and
goes and the guest learns of it only as end-of-file on read (nothing to read
and no host connected); poll() cannot wait for a host to connect (it reports
a hang-up at once), so while no one is connected the port is read every
HOST_POLL seconds. Each host session - first bytes to end-of-file - becomes
one connection of the server, bridged through a socketpair so the server
needs nothing special (a server that opens the port before it serves makes
the first one ahead: a guest restored from a snapshot finds it made). The
guest may miss a client's departure when the next one follows quickly; a
Boundaries finder handed in by the server, which knows its protocol, finds
the change in the bytes (this module knows none).
QEMU's socket takes one client at a time; on the host the VM launcher runs a
relay that puts many clients onto that one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from .address import SerialAddress

PORTS = Path("/sys/class/virtio-ports")
HOST_POLL = 0.05
_CHUNK = 1 << 16


class PortError(ConnectionError):
    """No such port, or the host side is not connected."""


def find_port(name: str, timeout: float = 0.0) -> str:
    """The device of the port called `name` (a path is taken as it is)."""
    if name.startswith("/"):
        return name
    deadline = time.monotonic() + timeout
    while True:
        for entry in sorted(PORTS.glob("*")) if PORTS.is_dir() else []:
            with contextlib.suppress(OSError):
                if (entry / "name").read_text().strip() == name:
                    return f"/dev/{entry.name}"
        if time.monotonic() >= deadline:
            raise PortError(
                f"no virtio-serial port named {name!r} (is the virtio_console module loaded "
                "and the port given to the VM?)"
            )
        time.sleep(0.05)


def _settle(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, _settle, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _read(fd: int) -> bytes:
    """The next bytes from the port; b"" when no host is connected."""
    while True:
        try:
            return os.read(fd, _CHUNK)
        except BlockingIOError:
            await _readable(fd)


async def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            # Write readiness is no use here (a missing host reads as ready):
            # the reader notices a departed host and cancels us.
            await asyncio.sleep(0.002)


#: A run of bytes from the host, and whether a new client starts with it.
Piece = tuple[bool, bytes]


class Boundaries(Protocol):
    """Finds where a new client starts in the bytes from a port's host side (sans-IO).

    The guest may miss one host client leaving and the next arriving (both
    between two reads); only the protocol spoken can tell from the bytes, so
    the port's user hands a finder in. `feed` returns the bytes as pieces,
    each marked True where a new client starts with it.
    """

    def feed(self, data: bytes) -> list[Piece]: ...


class PortServer:
    """Serves one port: each host client becomes a connection of `protocol_factory`.

    `boundaries` makes the finder that tells one client from the next; without
    one a client lasts until the host side disconnects.
    """

    def __init__(
        self,
        address: SerialAddress,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        *,
        boundaries: Callable[[], Boundaries] | None = None,
    ) -> None:
        self.address = address
        self._factory = protocol_factory
        self._make_boundaries = boundaries
        self._fd = os.open(
            find_port(address.name, timeout=5.0), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC
        )
        self._boundaries = self._new_boundaries()
        #: The server's end of the next client's connection, made before that client comes.
        self._next: socket.socket | None = None
        self._task: asyncio.Future[None] | None = None

    async def prepare(self) -> None:
        """Make the first client's connection now, before serving: a guest restored from
        a snapshot (docs/vm.md) finds it made instead of running that code anew after
        the restore. Later clients' connections are made when they come."""
        if self._next is None:
            self._next = await self._connect()

    async def start_serving(self) -> None:
        """Read the port from now on: the host's bytes reach the server."""
        if self._task is None and self._fd >= 0:
            self._task = asyncio.ensure_future(self._serve())

    async def _connect(self) -> socket.socket:
        """A new connection of the server, over a socketpair; our end of it."""
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self._factory, theirs)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        return ours

    async def _serve(self) -> None:
        pieces: list[Piece] = []
        while True:
            # Made when its client's first bytes come (a connection may act when it is
            # made - the debug console starts a shell), unless prepare() made it.
            pieces = pieces or await self._wait_for_host()
            ours, self._next = self._next or await self._connect(), None
            with contextlib.closing(ours):
                pieces = await self._session(ours, pieces)

    async def _from_host(self) -> list[Piece] | None:
        """What the host sent next; None when it has gone."""
        data = await _read(self._fd)
        if not data:
            self._boundaries = self._new_boundaries()
            return None
        return self._boundaries.feed(data) if self._boundaries else [(False, data)]

    def _new_boundaries(self) -> Boundaries | None:
        return self._make_boundaries() if self._make_boundaries else None

    async def _wait_for_host(self) -> list[Piece]:
        while True:
            pieces = await self._from_host()
            if pieces:
                return pieces
            if pieces is None:
                await asyncio.sleep(HOST_POLL)

    async def _session(self, ours: socket.socket, pieces: list[Piece]) -> list[Piece]:
        """One client's connection; what belongs to the next client, if one came."""
        to_server = asyncio.ensure_future(self._host_to_server(ours, pieces))
        to_host = asyncio.ensure_future(self._server_to_host(ours))
        await asyncio.wait({to_server, to_host}, return_when=asyncio.FIRST_COMPLETED)
        to_host.cancel()
        if not to_server.done():
            to_server.cancel()
            return []
        return to_server.result()

    async def _host_to_server(self, sock: socket.socket, pieces: list[Piece]) -> list[Piece]:
        loop = asyncio.get_running_loop()
        first = True
        while True:
            for index, (new_client, chunk) in enumerate(pieces):
                if new_client and not first:
                    return pieces[index:]
                first = False
                await loop.sock_sendall(sock, chunk)
            got = await self._from_host()
            if got is None:
                return []
            pieces = got

    async def _server_to_host(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while data := await loop.sock_recv(sock, _CHUNK):
            await _write_all(self._fd, data)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._next is not None:
            self._next.close()
            self._next = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def wait_closed(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class PortWriter:
    """A port opened for writing whole records (span export), blocking, with a timeout."""

    def __init__(self, address: SerialAddress, timeout: float = 1.0) -> None:
        self.timeout = timeout
        path = find_port(address.name)
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise PortError(f"cannot open {path}: {exc.strerror}") from exc

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        while view:
            try:
                view = view[os.write(self._fd, view) :]
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                raise PortError(f"writing to the port failed: {exc.strerror}") from exc
            events = poller.poll(self.timeout * 1000)
            if not events:
                raise PortError(errno.ETIMEDOUT, "the port's host side does not read")
            if events[0][1] & select.POLLHUP:
                raise PortError(errno.ENOTCONN, "no one is connected to the port's host side")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
