"""Addresses and the sockets behind them: vsock, unix, abstract unix, hybrid vsock.

Address forms (as the Kata agent, runtime and agent-ctl spell them):

    vsock://CID:PORT     AF_VSOCK; CID -1 means any (listen) - VMADDR_CID_ANY
    unix:///PATH         filesystem unix socket
    unix://@NAME         abstract unix socket (Linux; no file)
    hvsock:///PATH:PORT  hybrid vsock: the VMM's unix socket PATH, then the
                         line exchange "CONNECT PORT\\n" -> "OK N\\n" (connect);
                         listening binds the unix socket PATH_PORT, where the
                         VMM delivers guest connections to that host port.
    serial://NAME        (pykata extension, in a guest) the virtio-serial port
                         called NAME, or serial:///dev/vportNpM; one host client
                         at a time (virtio_serial.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .virtio_serial import Boundaries

FORMS = "vsock://CID:PORT, unix:///PATH, unix://@NAME, hvsock:///PATH:PORT, serial://NAME"
#: The longest reply a VMM gives to CONNECT ("OK <u32>\n" with room to spare).
_HANDSHAKE_LIMIT = 64


@dataclass(frozen=True)
class VsockAddress:
    cid: int
    port: int

    def __str__(self) -> str:
        return f"vsock://{self.cid}:{self.port}"


@dataclass(frozen=True)
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return f"unix://{self.path}"


@dataclass(frozen=True)
class AbstractAddress:
    name: str

    def __str__(self) -> str:
        return f"unix://@{self.name}"


@dataclass(frozen=True)
class HybridVsockAddress:
    uds_path: str
    port: int

    def __str__(self) -> str:
        return f"hvsock://{self.uds_path}:{self.port}"

    @property
    def listen_path(self) -> str:
        """Where a host-side listener for guest connections to `port` binds."""
        return f"{self.uds_path}_{self.port}"


@dataclass(frozen=True)
class SerialAddress:
    """A virtio-serial port in a guest, by name (or by device path)."""

    name: str

    def __str__(self) -> str:
        return f"serial://{self.name}"


Address = VsockAddress | UnixAddress | AbstractAddress | HybridVsockAddress | SerialAddress


class AddressError(ValueError):
    """An address that is malformed or names an unsupported form."""


class TransportError(ConnectionError):
    """Connecting, listening or the hybrid vsock handshake failed."""


def _bad(text: str, why: str) -> AddressError:
    return AddressError(f"invalid address {text!r}: {why}; accepted forms: {FORMS}")


def _port(text: str, value: str, bits: int = 32) -> int:
    if not re.fullmatch(r"\d+", value):
        raise _bad(text, f"port {value!r} is not a non-negative integer")
    port = int(value)
    if port >= 1 << bits:
        raise _bad(text, f"port {port} is out of range")
    return port


def parse_address(text: str) -> Address:
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise _bad(text, "no scheme")
    if scheme == "vsock":
        cid_text, colon, port_text = rest.rpartition(":")
        if not colon or not re.fullmatch(r"-1|\d+", cid_text):
            raise _bad(text, "expected vsock://CID:PORT with CID a number or -1")
        cid = int(cid_text)
        if cid >= 1 << 32:
            raise _bad(text, f"CID {cid} is out of range")
        return VsockAddress(cid, _port(text, port_text))
    if scheme == "unix":
        if rest.startswith("@"):
            if len(rest) == 1:
                raise _bad(text, "empty abstract socket name")
            return AbstractAddress(rest[1:])
        if not rest.startswith("/"):
            raise _bad(text, "a unix socket path must be absolute (unix:///PATH)")
        return UnixAddress(rest)
    if scheme == "hvsock":
        path, colon, port_text = rest.rpartition(":")
        if not colon or not path.startswith("/"):
            raise _bad(text, "expected hvsock:///PATH:PORT with an absolute PATH")
        return HybridVsockAddress(path, _port(text, port_text))
    if scheme == "serial":
        if not rest or (not rest.startswith("/") and not re.fullmatch(r"[\w.-]+", rest)):
            raise _bad(text, "expected serial://PORT-NAME or serial:///dev/vportNpM")
        return SerialAddress(rest)
    raise _bad(text, f"unsupported scheme {scheme!r}")


def as_address(address: str | Address) -> Address:
    return parse_address(address) if isinstance(address, str) else address


# --- listening ----------------------------------------------------------------


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


def _bound_socket(address: Address) -> socket.socket:
    if isinstance(address, VsockAddress):
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        cid = socket.VMADDR_CID_ANY if address.cid == -1 else address.cid
        try:
            sock.bind((cid, address.port))
        except OSError:
            sock.close()
            raise
        return sock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if isinstance(address, AbstractAddress):
            sock.bind("\0" + address.name)
            return sock
        assert not isinstance(address, SerialAddress)  # served by virtio_serial, not bound
        path = address.listen_path if isinstance(address, HybridVsockAddress) else address.path
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


def _socket_path(address: Address) -> str | None:
    if isinstance(address, UnixAddress):
        return address.path
    if isinstance(address, HybridVsockAddress):
        return address.listen_path
    return None


def peer_credentials(transport: asyncio.BaseTransport) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a unix socket peer; None for other sockets."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of a connection, as far as the socket can tell:
    a unix socket's process (SO_PEERCRED), or a vsock peer's CID and port."""

    pid: int | None = None
    uid: int | None = None
    cid: int | None = None
    port: int | None = None

    @property
    def key(self) -> tuple[str, int | None, int | None]:
        """The same for every connection of one peer process (or one VM)."""
        if self.cid is not None:
            return ("cid", self.cid, None)
        return ("process", self.uid, self.pid)

    def log_fields(self) -> dict[str, int]:
        names = {"peer_pid": self.pid, "peer_uid": self.uid}
        names.update(peer_cid=self.cid, peer_port=self.port)
        return {name: value for name, value in names.items() if value is not None}


def peer_of(transport: asyncio.BaseTransport) -> Peer:
    creds = peer_credentials(transport)
    if creds is not None:
        return Peer(pid=creds[0], uid=creds[1])
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == getattr(socket, "AF_VSOCK", None):
        with contextlib.suppress(OSError):
            cid, port = sock.getpeername()
            return Peer(cid=cid, port=port)
    return Peer()


class Serving(Protocol):
    """What a listener stops: an asyncio.Server, or a virtio-serial port server."""

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class Listener:
    """A listening socket serving `protocol_factory` connections, with cleanup."""

    def __init__(self, address: Address, server: Serving) -> None:
        self.address = address
        self._server = server
        self._path = _socket_path(address)
        # Remembered so close() never removes a socket another process put there since.
        self._inode = os.stat(self._path).st_ino if self._path else None
        self._uid = os.geteuid()

    def admits(self, transport: asyncio.BaseTransport) -> bool:
        """Abstract sockets have no file permissions: admit only our own uid and root."""
        if not isinstance(self.address, AbstractAddress):
            return True
        creds = peer_credentials(transport)
        return creds is not None and creds[1] in (0, self._uid)

    def close(self) -> None:
        """Stop accepting; the socket file goes with it."""
        self._server.close()
        if self._path is not None:
            # OSError too: after dropping privileges the directory may be out of reach.
            with contextlib.suppress(OSError):
                if os.stat(self._path).st_ino == self._inode:
                    os.unlink(self._path)
            self._path = None

    async def wait_closed(self) -> None:
        await self._server.wait_closed()


async def listen(
    address: str | Address,
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    *,
    backlog: int = 128,
    boundaries: Callable[[], Boundaries] | None = None,
) -> Listener:
    """Serve `address`. `boundaries`: for a serial port, which has no connections,
    makes the finder that tells one client from the next in the bytes (the
    protocol's to know); other transports have connections and do not use it."""
    address = as_address(address)
    if isinstance(address, SerialAddress):
        from .virtio_serial import PortServer

        try:
            return Listener(address, PortServer(address, protocol_factory, boundaries=boundaries))
        except OSError as exc:
            raise TransportError(f"cannot serve on {address}: {exc}") from exc
    loop = asyncio.get_running_loop()
    try:
        sock = _bound_socket(address)
    except TransportError:
        raise
    except OSError as exc:
        raise TransportError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
    try:
        server = await loop.create_server(protocol_factory, sock=sock, backlog=backlog)
    except BaseException:
        sock.close()
        raise
    return Listener(address, server)


# --- connecting ---------------------------------------------------------------


async def _hybrid_handshake(sock: socket.socket, address: HybridVsockAddress) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, f"CONNECT {address.port}\n".encode())
    reply = bytearray()
    # One byte at a time: nothing after the newline belongs to the handshake.
    while not reply.endswith(b"\n"):
        chunk = await loop.sock_recv(sock, 1)
        if not chunk or len(reply) >= _HANDSHAKE_LIMIT:
            break
        reply += chunk
    _check_handshake(address, reply)


def _check_handshake(address: HybridVsockAddress, reply: bytes | bytearray) -> None:
    line = reply.decode("ascii", "replace").strip()
    if not re.fullmatch(r"OK \d+", line):
        got = repr(line) if reply else "connection closed"
        raise TransportError(
            f"hybrid vsock handshake with {address.uds_path} for port {address.port} failed: "
            f"expected 'OK <port>', got {got}"
        )


def _connect_socket(address: Address) -> tuple[socket.socket, tuple[int, int] | str]:
    if isinstance(address, SerialAddress):
        raise TransportError(f"{address} is a guest's port: serve on it, or open it for writing")
    if isinstance(address, VsockAddress):
        cid = socket.VMADDR_CID_ANY if address.cid == -1 else address.cid
        return socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM), (cid, address.port)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if isinstance(address, AbstractAddress):
        return sock, "\0" + address.name
    if isinstance(address, HybridVsockAddress):
        return sock, address.uds_path
    return sock, address.path


async def connect(
    address: str | Address,
    protocol_factory: Callable[[], asyncio.Protocol],
    *,
    timeout: float | None = None,
) -> tuple[asyncio.Transport, asyncio.Protocol]:
    address = as_address(address)
    loop = asyncio.get_running_loop()
    sock, target = _connect_socket(address)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, target)
            if isinstance(address, HybridVsockAddress):
                await _hybrid_handshake(sock, address)
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
    sock, target = _connect_socket(address)
    sock.settimeout(timeout)
    try:
        sock.connect(target)
        if isinstance(address, HybridVsockAddress):
            sock.sendall(f"CONNECT {address.port}\n".encode())
            reply = bytearray()
            while not reply.endswith(b"\n") and len(reply) < _HANDSHAKE_LIMIT:
                chunk = sock.recv(1)
                if not chunk:
                    break
                reply += chunk
            _check_handshake(address, reply)
    except TransportError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise TransportError(f"cannot connect to {address}: {reason}") from exc
    return sock
