"""PortForward: one TCP connection inside the sandbox's network namespace,
carried over one stream.

The socket is made in the sandbox's namespace (a socket belongs to the
namespace it was made in) by a worker thread that visits it, so the event
loop's thread never changes namespace. Hosts are IP addresses only: a name
would be resolved with the agent's resolver, not the sandbox's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket

from ..api import extensions_pb2 as ext
from .channel import Channel
from .errors import FailedPrecondition, InvalidArgument, LimitExceeded, Unavailable
from .network import _setns

#: Seconds to wait for the target to accept.
CONNECT_TIMEOUT = 10.0


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


class Forwards:
    """Every forward open now, all connections together (bounded)."""

    def __init__(self, limit: int, chunk: int) -> None:
        self.limit = limit
        self.chunk = chunk
        self.open = 0

    async def run(
        self, channel: Channel[ext.ForwardMessage], netns: str | None, target: tuple[int, str, int]
    ) -> None:
        """Carry `target` (from target_address) over `channel` until both sides end."""
        family, host, port = target
        if self.open >= self.limit:
            raise LimitExceeded(f"too many port forwards open (limit {self.limit})")
        self.open += 1
        try:
            sock = await asyncio.to_thread(_socket_in, netns, family)
            with sock:
                await _connect(sock, host, port)
                channel.send(ext.ForwardMessage(opened=True))
                await _pump(channel, sock, self.chunk)
        finally:
            self.open -= 1


async def _connect(sock: socket.socket, host: str, port: int) -> None:
    sock.setblocking(False)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except TimeoutError:
        raise Unavailable(
            f"connecting to {host}:{port} in the sandbox network: no answer in {CONNECT_TIMEOUT:g}s"
        ) from None
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise Unavailable(f"connecting to {host}:{port} in the sandbox network: {reason}") from None


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
        channel.send(ext.ForwardMessage(data=data))


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
            ack = channel.receive_window.consumed(len(message.data))
            if ack:
                channel.send(ext.ForwardMessage(ack=ack))
        if message.eof and not eof:
            eof = True
            if writer.can_write_eof():
                writer.write_eof()
