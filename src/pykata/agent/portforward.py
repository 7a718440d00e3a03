"""PortForward: one connection, to a TCP port inside the sandbox's network
namespace or to a unix socket in a container, carried over one stream.

A TCP socket is made in the sandbox's namespace (a socket belongs to the
namespace it was made in) by a worker thread that visits it, so the event
loop's thread never changes namespace. Hosts are IP addresses only: a name
would be resolved with the agent's resolver, not the sandbox's. A unix
socket's path is resolved inside the container's root (inroot.py) to an
O_PATH fd, and the connection made through that fd (/proc/self/fd/N): the
path the kernel connects to is the one that was checked, never one a
symlink swapped in meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import stat
from collections.abc import Awaitable, Callable

from ..api import extensions_pb2 as ext
from ..extensions.wire import data_tag
from .channel import Channel
from .errors import FailedPrecondition, InvalidArgument, LimitExceeded, Unavailable
from .inroot import open_in
from .network import _setns

#: Seconds to wait for the target to accept.
CONNECT_TIMEOUT = 10.0
DATA_TAG = data_tag(ext.ForwardMessage, "data")


def target_address(target: ext.ForwardTarget) -> tuple[int, str, int]:
    """(family, host, port) of a target; INVALID_ARGUMENT for anything else."""
    host = target.host or "127.0.0.1"
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise InvalidArgument(
            f"forward target host {target.host!r} is not an IP address (names are not "
            "resolved: the agent's resolver is not the sandbox's)"
        ) from None
    if not 0 < target.port < 65536:
        raise InvalidArgument(f"forward target port {target.port} is not in 1..65535")
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return family, str(ip), target.port


def _socket_in(netns_path: str | None, family: int) -> socket.socket:
    if netns_path is None:
        return socket.socket(family, socket.SOCK_STREAM)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise FailedPrecondition(
                f"the sandbox network {netns_path} is gone: {exc.strerror}"
            ) from None
        try:
            _setns(target)
            try:
                return socket.socket(family, socket.SOCK_STREAM)
            finally:
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)


#: Makes the forwarded connection: a socket connected to the target.
Connector = Callable[[], Awaitable[socket.socket]]


async def connect_tcp(netns_path: str | None, target: tuple[int, str, int]) -> socket.socket:
    """A socket in the sandbox's network, connected to `target` (from target_address)."""
    family, host, port = target
    sock = await asyncio.to_thread(_socket_in, netns_path, family)
    try:
        await _connect(sock, (host, port), f"{host}:{port} in the sandbox network")
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_unix(root_fd: int, path: str) -> socket.socket:
    """A socket connected to the unix socket at `path` inside the root `root_fd`."""
    fd = open_in(root_fd, path, os.O_PATH)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise InvalidArgument(f"forward target {path!r} is not a unix socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await _connect(sock, f"/proc/self/fd/{fd}", f"unix socket {path}")
        except BaseException:
            sock.close()
            raise
        return sock
    finally:
        os.close(fd)


class Forwards:
    """Every forward open now, all connections together (bounded)."""

    def __init__(self, limit: int, chunk: int) -> None:
        self.limit = limit
        self.chunk = chunk
        self.open = 0

    async def run(self, channel: Channel[ext.ForwardMessage], connect: Connector) -> None:
        """Connect, then carry the connection over `channel` until both sides end."""
        if self.open >= self.limit:
            raise LimitExceeded(f"too many port forwards open (limit {self.limit})")
        self.open += 1
        try:
            with await connect() as sock:
                channel.send(ext.ForwardMessage(opened=True))
                await _pump(channel, sock, self.chunk)
        finally:
            self.open -= 1


async def _connect(sock: socket.socket, address: str | tuple[str, int], what: str) -> None:
    sock.setblocking(False)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await asyncio.get_running_loop().sock_connect(sock, address)
    except TimeoutError:
        raise Unavailable(f"connecting to {what}: no answer in {CONNECT_TIMEOUT:g}s") from None
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise Unavailable(f"connecting to {what}: {reason}") from None


async def _pump(channel: Channel[ext.ForwardMessage], sock: socket.socket, chunk: int) -> None:
    """Both directions until each has ended; the socket's buffers and the windows
    bound what is held."""
    reader, writer = await asyncio.open_connection(sock=sock, limit=chunk)
    # Our own high-water mark: drain() waits while this much is unsent.
    writer.transport.set_write_buffer_limits(high=chunk)
    out = asyncio.ensure_future(_target_to_client(channel, reader, chunk))
    try:
        await _client_to_target(channel, writer)
        # The client has closed its side: it acknowledges nothing more.
        channel.send_window.close(
            InvalidArgument("the client closed the stream before the forwarded connection ended")
        )
        await out
    finally:
        out.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await out
        writer.transport.abort()


async def _target_to_client(
    channel: Channel[ext.ForwardMessage], reader: asyncio.StreamReader, chunk: int
) -> None:
    while True:
        try:
            data = await reader.read(chunk)
        except OSError as exc:
            raise Unavailable(f"the forwarded connection failed: {exc.strerror}") from None
        if not data:
            channel.send(ext.ForwardMessage(eof=True))
            return
        await channel.send_window.reserve(len(data))
        channel.send_data(DATA_TAG, data)


async def _client_to_target(
    channel: Channel[ext.ForwardMessage], writer: asyncio.StreamWriter
) -> None:
    """Until the client has sent its end (eof), then until it closes its side."""
    eof = False
    while True:
        message = await channel.recv()
        if message is None:
            if not eof:
                raise InvalidArgument("the client closed the stream before sending eof")
            return
        if message.data:  # (its ack, and the window, were taken by the channel)
            if eof:
                raise InvalidArgument("data after eof")
            writer.write(message.data)
            try:
                await writer.drain()
            except OSError as exc:
                raise Unavailable(f"the forwarded connection failed: {exc.strerror}") from None
            channel.consumed(len(message.data), lambda ack: ext.ForwardMessage(ack=ack))
        if message.eof and not eof:
            eof = True
            if writer.can_write_eof():
                writer.write_eof()
