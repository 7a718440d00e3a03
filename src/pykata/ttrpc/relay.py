"""Many ttRPC clients over one upstream connection.

A virtio-serial port carries one byte stream, so only one client could talk
to a guest's agent at a time. The relay holds that one connection and
listens for any number of clients, renumbering their streams onto it: every
client numbers its streams 1, 3, 5, ..., the relay gives each (client,
stream) an id of its own upstream and maps the answers back. Answers for a
client that has gone are dropped, never delivered to another.

Every client shares the one upstream connection, so each is bounded on its
own (RelayLimits): how many clients, calls in flight per client, answers a
client leaves unread. A client that misbehaves is refused or closed; the
others go on. Requests wait in the clients' sockets while the upstream does
not take them (a serial port is slow).

StreamMap is the pure part (no I/O); Relay wires it to sockets; RelayThread
runs one on its own event loop for callers that are not asyncio programs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass

from google.rpc import status_pb2

from .. import transport
from .frame import Frame, FrameDecoder, MessageType, OversizeFrame, encode_frame
from .protocol import ServerConnection, oversize_message
from .status import Code

log = logging.getLogger("pykata.ttrpc.relay")


@dataclass(frozen=True)
class RelayLimits:
    """What one client can make the relay hold (docs/ttrpc.md, Relay)."""

    #: Clients at once; a further connection is closed at once.
    max_clients: int = 32
    #: Calls in flight per client; a further call is answered RESOURCE_EXHAUSTED. Well
    #: under the agent's own per-connection limit (1,024), which all clients share here.
    max_calls_per_client: int = 256
    #: Answers waiting for a client: above this its requests are not read until they
    #: drain to a quarter of it (nothing is lost: they wait in its socket).
    reply_high_water: int = 1 << 20
    #: Answers waiting for a client that still does not read (its calls were already in
    #: flight): past this the client is closed.
    max_unread_bytes: int = 16 << 20
    #: Requests waiting for the upstream: above this no client is read until it drains.
    upstream_high_water: int = 1 << 20


class StreamMap:
    """Which upstream stream carries which client's stream (sans-IO)."""

    def __init__(self) -> None:
        self._next = 1  # client-initiated ttRPC streams are odd
        self._upstream: dict[tuple[Hashable, int], int] = {}
        self._clients: dict[int, tuple[Hashable, int]] = {}
        self._open = Counter[Hashable]()

    def known(self, client: Hashable, stream_id: int) -> bool:
        """Whether this client's stream is already carried (a later frame of it)."""
        return (client, stream_id) in self._upstream

    def open_streams(self, client: Hashable) -> int:
        """The client's streams not yet answered."""
        return self._open[client]

    def outbound(self, client: Hashable, stream_id: int) -> int:
        """The upstream id for a client's stream (the same for all its frames)."""
        key = (client, stream_id)
        relayed = self._upstream.get(key)
        if relayed is None:
            relayed = self._next
            self._next += 2
            self._upstream[key] = relayed
            self._clients[relayed] = key
            self._open[client] += 1
        return relayed

    def inbound(self, relayed: int, final: bool) -> tuple[Hashable, int] | None:
        """Whose stream an upstream frame belongs to; None if that client has gone.

        `final`: the frame ends the stream (a response), so the ids are freed.
        """
        key = self._clients.get(relayed)
        if key is not None and final:
            del self._clients[relayed]
            del self._upstream[key]
            self._open[key[0]] -= 1
            if not self._open[key[0]]:
                del self._open[key[0]]
        return key

    def forget(self, client: Hashable) -> None:
        """A client left: its streams' answers will be dropped."""
        for key in [key for key in self._upstream if key[0] is client]:
            del self._clients[self._upstream.pop(key)]
        self._open.pop(client, None)

    def __len__(self) -> int:
        return len(self._upstream)


class _Client(asyncio.Protocol):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.unread_answers = False  # its answers are above the high-water mark

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        limits = self.relay.limits
        if len(self.relay.clients) >= limits.max_clients:
            log.warning("relay: a client refused: %d clients already", limits.max_clients)
            transport.close()
            return
        high = limits.reply_high_water
        transport.set_write_buffer_limits(high=high, low=high // 4)
        self.relay.clients.add(self)
        self.update_reading()

    def data_received(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            self.relay.from_client(self, frame)

    def pause_writing(self) -> None:
        self.unread_answers = True
        self.update_reading()

    def resume_writing(self) -> None:
        self.unread_answers = False
        self.update_reading()

    def update_reading(self) -> None:
        """Read requests unless this client's answers or the upstream's requests pile up."""
        assert self.transport is not None
        if self.transport.is_closing():
            return
        if self.unread_answers or self.relay.upstream_full:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.clients.discard(self)
        self.relay.streams.forget(self)


class _Upstream(asyncio.Protocol):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.decoder = FrameDecoder()

    def data_received(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            if isinstance(frame, Frame):
                self.relay.from_upstream(frame)

    def pause_writing(self) -> None:
        self.relay.set_upstream_full(True)

    def resume_writing(self) -> None:
        self.relay.set_upstream_full(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.upstream_lost()


class Relay:
    """Listens on `listen`; carries every client's calls over one connection to `upstream`."""

    def __init__(self, limits: RelayLimits | None = None) -> None:
        self.limits = limits or RelayLimits()
        self.streams = StreamMap()
        self.clients: set[_Client] = set()
        self.upstream_full = False
        self._upstream: asyncio.Transport | None = None
        self._listener: transport.Listener | None = None
        self.closed = asyncio.Event()

    async def start(self, upstream: str, listen: str) -> None:
        up, _ = await transport.connect(upstream, lambda: _Upstream(self), timeout=10)
        up.set_write_buffer_limits(high=self.limits.upstream_high_water)
        self._upstream = up
        self._listener = await transport.listen(listen, lambda: _Client(self))

    def from_client(self, client: _Client, frame: Frame | OversizeFrame) -> None:
        assert client.transport is not None and self._upstream is not None
        if isinstance(frame, OversizeFrame):  # answered here: the data was never kept
            self._refuse(client, frame.stream_id, oversize_message(frame.length))
            return
        limit = self.limits.max_calls_per_client
        new = not self.streams.known(client, frame.stream_id)
        if new and self.streams.open_streams(client) >= limit:
            message = f"too many calls in flight through the relay (limit {limit})"
            self._refuse(client, frame.stream_id, message)
            return
        relayed = self.streams.outbound(client, frame.stream_id)
        self._upstream.write(encode_frame(relayed, frame.type, frame.flags, frame.data))

    def _refuse(self, client: _Client, stream_id: int, message: str) -> None:
        assert client.transport is not None
        status = status_pb2.Status(code=Code.RESOURCE_EXHAUSTED, message=message)
        client.transport.write(ServerConnection().response(stream_id, status))

    def from_upstream(self, frame: Frame) -> None:
        owner = self.streams.inbound(frame.stream_id, final=frame.type == MessageType.RESPONSE)
        if owner is None:
            return
        client, stream_id = owner
        assert isinstance(client, _Client) and client.transport is not None
        client.transport.write(encode_frame(stream_id, frame.type, frame.flags, frame.data))
        unread = client.transport.get_write_buffer_size()
        if unread > self.limits.max_unread_bytes:
            log.warning("relay: a client closed: %d bytes of answers it does not read", unread)
            client.transport.abort()

    def set_upstream_full(self, full: bool) -> None:
        """The upstream takes no more for now (or again): every client waits (or reads)."""
        self.upstream_full = full
        for client in self.clients:
            client.update_reading()

    def upstream_lost(self) -> None:
        """The agent's side went (the guest stopped): so do the clients."""
        self.close()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for client in list(self.clients):
            if client.transport is not None:
                client.transport.close()
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None
        self.closed.set()


class RelayThread:
    """A Relay on an event loop of its own, for synchronous callers."""

    def __init__(self, upstream: str, listen: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._relay: Relay | None = None
        self._failure: BaseException | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(upstream, listen), name="ttrpc-relay", daemon=True
        )
        self._thread.start()
        self._started.wait()
        if self._failure is not None:
            self._thread.join()
            raise self._failure

    def _run(self, upstream: str, listen: str) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve(upstream, listen))
        finally:
            self._loop.close()

    async def _serve(self, upstream: str, listen: str) -> None:
        relay = Relay()
        try:
            await relay.start(upstream, listen)
        except BaseException as exc:  # kept for the starting thread, not lost in this one
            self._failure = exc
            relay.close()
            return
        finally:
            self._relay = relay
            self._started.set()
        await relay.closed.wait()

    def close(self) -> None:
        if self._thread.is_alive() and self._relay is not None:
            with contextlib.suppress(RuntimeError):  # the loop ended on its own meanwhile
                self._loop.call_soon_threadsafe(self._relay.close)
        self._thread.join(5)
