"""An asyncio ttRPC server: services registered by name, one task per call.

The wire rules live in protocol.ServerConnection; this module only moves
bytes between it and a socket and runs handlers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, cast

from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2

from .. import transport as transport_mod
from ..log import RateLimit
from ..transport import Address, Listener
from .boundaries import ClientBoundaries
from .busypoll import BusyPoll
from .frame import HEADER_SIZE, MAX_DATA_SIZE, FrameTooLarge
from .interceptor import chain
from .protocol import (
    DataReceived,
    RequestReceived,
    ServerConnection,
    StreamRejected,
    data_frame_header,
    data_frame_parts,
    oversize_message,
)
from .splice import (
    PipeShort,
    read_exactly,
    send_buffer,
    set_send_buffer,
    splice_now,
    write_now,
)
from .status import Code, TtrpcError

log = logging.getLogger("pykata.ttrpc.server")

_OK = status_pb2.Status(code=Code.OK)


@dataclass(slots=True)
class ServerContext:
    """What a handler (and an interceptor) may know about its call besides the request."""

    service: str
    method: str
    stream_id: int
    #: Request metadata; a key may carry several values.
    metadata: dict[str, list[str]]
    #: Client deadline in seconds from the call's start, if it set one.
    timeout: float | None
    #: Peer credentials (pid, uid, gid) where the transport has them.
    peer: tuple[int, int, int] | None = None

    def first(self, key: str) -> str | None:
        values = self.metadata.get(key)
        return values[0] if values else None


class EncodedResponse:
    """A response its handler has already encoded (protobuf wire bytes, in pieces).

    For bulk data: a handler that answers a megabyte of output saves the
    copies that building a message and serializing it would cost; the
    pieces are written to the socket as they are.
    """

    __slots__ = ("parts",)

    def __init__(self, *parts: bytes) -> None:
        self.parts = parts

    def SerializeToString(self) -> bytes:  # as a protobuf Message
        return b"".join(self.parts)


#: What a unary handler answers: a message, or one already encoded.
UnaryResponse = Message | EncodedResponse
UnaryHandler = Callable[[Any, ServerContext], Awaitable[UnaryResponse]]
#: Runs around a unary handler: `await interceptor(request, ctx, handler)`, where
#: `handler(request, ctx)` is the rest of the chain (see Server).
UnaryServerInterceptor = Callable[[Any, ServerContext, UnaryHandler], Awaitable[UnaryResponse]]


class ServerStream:
    """Both directions of a streaming call, as raw payloads.

    Messages the handler has not taken yet are held up to `max_buffered`
    payload bytes (Limits.stream_buffer_bytes); a client that sends more
    (one not keeping to its service's flow control) fails the call with
    RESOURCE_EXHAUSTED, and what it sent beyond is dropped.
    """

    def __init__(self, conn: _Connection, stream_id: int, max_buffered: int = 1 << 62) -> None:
        self._conn = conn
        self._stream_id = stream_id
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._max_buffered = max_buffered
        self._buffered = 0
        self._overrun = False

    async def recv(self) -> bytes | None:
        """The next message from the client; None once it has closed its side."""
        payload = await self._inbox.get()
        if payload is not None:
            self._buffered -= len(payload)
        return payload

    def send(self, payload: bytes) -> None:
        self._conn.send(self._conn.protocol.data(self._stream_id, payload))

    def send_parts(self, head: bytes, data: bytes) -> None:
        """Send the payload `head` + `data` without joining them: a big `data` (a
        megabyte of output) goes to the socket as it is, not copied."""
        self._conn.send(*data_frame_parts(self._stream_id, head, data))

    def send_from_pipe(self, head: bytes, pipe: int, size: int) -> None:
        """Send the payload `head` + `size` bytes waiting in `pipe`, which nobody
        else reads before this returns: moved from the pipe into the socket by
        splice(2) where the connection allows, never through Python."""
        header = data_frame_header(self._stream_id, len(head) + size)
        self._conn.send_from_pipe(self._stream_id, header + head, pipe, size)

    @property
    def buffered(self) -> int:
        """Payload bytes received and not taken by recv() yet."""
        return self._buffered

    @property
    def overrun(self) -> bool:
        return self._overrun

    def overrun_status(self) -> status_pb2.Status:
        message = (
            f"the client sent more than {self._max_buffered} bytes the call had not "
            "taken yet (Limits.stream_buffer_bytes)"
        )
        return status_pb2.Status(code=Code.RESOURCE_EXHAUSTED, message=message)

    def _deliver(self, payload: bytes | None) -> None:
        if self._overrun:
            return
        if payload is not None:
            if self._buffered + len(payload) > self._max_buffered:
                # The call ends now, whatever its handler waits for.
                self._overrun = True
                self._conn._end_overrun(self._stream_id)
                return
            self._buffered += len(payload)
        self._inbox.put_nowait(payload)


StreamHandler = Callable[[ServerStream, ServerContext], Awaitable[bytes | None]]
#: Runs around a streaming handler: `await interceptor(stream, ctx, handler)`.
StreamServerInterceptor = Callable[
    [ServerStream, ServerContext, StreamHandler], Awaitable[bytes | None]
]


@dataclass(frozen=True)
class UnaryMethod:
    request_type: type[Message]
    handler: UnaryHandler


@dataclass(frozen=True)
class StreamMethod:
    """A streaming method; the handler's return value is the final response payload."""

    handler: StreamHandler


@dataclass
class Service:
    name: str
    methods: dict[str, UnaryMethod | StreamMethod] = field(default_factory=dict)

    @classmethod
    def from_descriptor(cls, descriptor: ServiceDescriptor, implementation: object) -> Service:
        """Bind `implementation`'s coroutine methods named after the RPCs.

        An RPC the implementation lacks is left out, so callers get
        UNIMPLEMENTED naming it.
        """
        service = cls(descriptor.full_name)
        for method in descriptor.methods:
            handler = getattr(implementation, method.name, None)
            if handler is None:
                continue
            request_type = message_factory.GetMessageClass(method.input_type)
            service.methods[method.name] = UnaryMethod(request_type, handler)
        return service


@dataclass(frozen=True)
class LazyService:
    """A service made on its first call: `load` imports its handlers' modules and
    returns the Service (named `name`). Until a call names it the server knows only
    the name, so a start-up that answers Health pays nothing for the others. If
    `load` fails, that call answers INTERNAL and the next call tries again."""

    name: str
    load: Callable[[], Service]


@dataclass(frozen=True)
class Limits:
    """What one client, and all clients together, can make a Server hold.

    Every field has a default that serves a Kata runtime (one long-lived
    connection with many long-poll calls on it) with room to spare.
    """

    #: Connections open at once; one more is closed as soon as it is accepted.
    max_connections: int = 128
    #: Calls in flight on one connection; one more is answered RESOURCE_EXHAUSTED.
    max_calls_per_connection: int = 1024
    #: Calls in flight that every connection may have, whatever the others do.
    guaranteed_calls: int = 16
    #: Calls in flight beyond each connection's guaranteed ones, all connections
    #: together; one more is answered RESOURCE_EXHAUSTED.
    max_calls: int = 4096
    #: Answer bytes queued for one connection (written, not yet taken by the
    #: peer) above which no more of its requests are read.
    reply_high_water: int = 1 << 20
    #: Answer bytes queued for all connections together; past it, the
    #: connection holding the most is closed (its peer does not read them).
    max_queued_replies: int = 64 << 20
    #: Bytes of frames not yet whole that every connection may hold, whatever the others do.
    guaranteed_frame_bytes: int = 16 << 10
    #: Bytes of frames not yet whole beyond each connection's guaranteed ones,
    #: all connections together; a connection that needs more is not read
    #: until there is room.
    max_frame_bytes: int = 32 << 20
    #: Seconds from a frame's first byte to its last; then the connection is closed.
    frame_timeout: float = 10.0
    #: Warnings about one peer's input: a burst of `peer_log_burst`, then
    #: `peer_log_rate` per second; the rest are counted, and the count is
    #: logged once the burst would have refilled.
    peer_log_rate: float = 1.0
    peer_log_burst: int = 10
    #: Payload bytes of one streaming call's messages received and not taken by
    #: its handler yet; past it the call fails RESOURCE_EXHAUSTED.
    stream_buffer_bytes: int = 8 << 20

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"{f.name} must be positive, got {getattr(self, f.name)!r}")
        if self.guaranteed_frame_bytes < HEADER_SIZE:
            raise ValueError(f"guaranteed_frame_bytes must be at least {HEADER_SIZE}")
        if self.guaranteed_frame_bytes + self.max_frame_bytes < HEADER_SIZE + MAX_DATA_SIZE:
            raise ValueError(
                "guaranteed_frame_bytes + max_frame_bytes must hold the largest frame "
                f"({HEADER_SIZE + MAX_DATA_SIZE} bytes)"
            )
        if self.max_queued_replies < self.reply_high_water:
            raise ValueError(
                f"max_queued_replies ({self.max_queued_replies}) must be at least "
                f"reply_high_water ({self.reply_high_water})"
            )


#: Largest single read from a connection: bounds what one read can add to memory.
READ_SIZE = 64 << 10
#: Answers queued in one loop turn are joined into one buffer below this many bytes.
COALESCE_JOIN_LIMIT = 256 << 10
#: Requests one connection may start before the other connections (and the
#: calls just started) get a turn of the event loop.
EVENTS_PER_TURN = 16

#: Peers whose suppressed warnings wait for their count line at once (a bound
#: on the timers; past it a count waits for the peer's next line instead).
MAX_REPORTS = 1024

# Why a connection is not being read (see _Connection._pause).
_REPLIES = "replies"  # its peer is not taking its answers
_FRAMES = "frames"  # the shared room for incomplete frames is full
_TURN = "turn"  # it had its turn; others go first


class _PeerWarnings:
    """Warnings about what a peer sent, rate-limited per peer and naming it."""

    def __init__(self, limits: Limits) -> None:
        self._limit = RateLimit(limits.peer_log_rate, limits.peer_log_burst)
        # A peer's suppressed warnings are counted in a line once its burst has refilled.
        self._report_after = limits.peer_log_burst / limits.peer_log_rate
        self._reports: dict[object, tuple[asyncio.TimerHandle, transport_mod.Peer]] = {}

    def warn(self, peer: transport_mod.Peer, message: str, *args: object, **extra: object) -> None:
        loop = asyncio.get_running_loop()
        suppressed = self._limit.allow(peer.key, loop.time())
        if suppressed is None:
            if peer.key not in self._reports and len(self._reports) < MAX_REPORTS:
                handle = loop.call_later(self._report_after, self._report, peer)
                self._reports[peer.key] = (handle, peer)
            return
        fields: dict[str, object] = {**peer.log_fields(), **extra}
        if suppressed:
            fields["suppressed"] = suppressed
        log.warning(message, *args, extra=fields)

    def _report(self, peer: transport_mod.Peer) -> None:
        self._reports.pop(peer.key, None)
        suppressed = self._limit.take_suppressed(peer.key)
        if suppressed:
            log.warning(
                "%d more warnings about this peer were suppressed",
                suppressed,
                extra={**peer.log_fields(), "suppressed": suppressed},
            )

    def close(self) -> None:
        """Log every count still waiting for its line."""
        for handle, peer in list(self._reports.values()):
            handle.cancel()
            self._report(peer)


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: Server, listener: Listener | None) -> None:
        self.server = server
        self.limits = server.limits
        self.listener = listener
        self.protocol = ServerConnection(max_streams=server.limits.max_calls_per_connection)
        # Kept, not looked up per call: on 3.11 each lookup costs a getpid() syscall.
        self.loop = asyncio.get_running_loop()
        self.busy_poll = server._busy_poll_on(self.loop)
        self.transport: asyncio.Transport | None = None
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.streams: dict[int, ServerStream] = {}
        self.peer: tuple[int, int, int] | None = None
        self.who = transport_mod.Peer()
        self._outbox: list[bytes] = []
        self._outbox_bytes = 0
        #: Why reading is paused; empty while it is not.
        self._paused: set[str] = set()
        #: The transport asked us to stop writing (pause_writing).
        self._write_blocked = False
        #: Bytes of the shared room reserved for the frame being received.
        self.reserved = 0
        #: Answer bytes queued in the transport, as last counted in the server's total.
        self.queued = 0
        self._frame_timer: asyncio.TimerHandle | None = None
        self._timed_frame = -1
        self._open = False
        #: The connection's stream socket, for splice(2); None on other transports.
        self._socket: Any = None
        #: What its send buffer was raised to hold for spliced frames (0: not raised),
        #: and what it held before; lowered again when the last such call ends.
        self._send_buffer = 0
        self._send_buffer_before = 0
        #: Calls that have spliced into the socket while it was raised.
        self._splicing: set[int] = set()

    # asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer = transport_mod.peer_credentials(transport)
        self.who = transport_mod.peer_of(transport)
        server = self.server
        if self.listener is not None and not self.listener.admits(transport):
            server.warnings.warn(
                self.who,
                "refused connection from a peer of another user on %s",
                self.listener.address,
            )
            self.transport.abort()
            return
        if len(server._connections) >= self.limits.max_connections:
            server.counters["connections_refused"] += 1
            server.warnings.warn(
                self.who,
                "refused connection: %d connections open, the limit",
                len(server._connections),
            )
            self.transport.abort()
            return
        self._open = True
        server._connections.add(self)
        sock = self.transport.get_extra_info("socket")
        if sock is not None and sock.type == socket.SOCK_STREAM:
            self._socket = sock
        self.transport.set_write_buffer_limits(high=self.limits.reply_high_water)

    def get_buffer(self, sizehint: int) -> memoryview:
        # Read no more than this connection may hold: its guaranteed bytes and
        # what it reserved for its frame. (At least one byte: asyncio needs a
        # buffer; a connection with no room is paused, so this is a bound.)
        room = self.limits.guaranteed_frame_bytes + self.reserved - self.protocol.buffered
        return self.server._read_buffer[: max(1, min(room, READ_SIZE))]

    def buffer_updated(self, nbytes: int) -> None:
        self.busy_poll.received()
        self.protocol.receive_data(bytes(self.server._read_buffer[:nbytes]))
        self._process()

    def eof_received(self) -> bool:
        if not self.protocol.end_of_input_is_clean():
            self.server.warnings.warn(
                self.who,
                "connection closed in the middle of a frame; dropping it",
                held=self.protocol.buffered,
            )
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._open:
            return
        self._open = False
        server = self.server
        server._connections.discard(self)
        self._cancel_frame_timer()
        server._forget_replies(self)
        server._frame_waiters.pop(self, None)
        server._release_frame_room(self)
        for task in self.tasks.values():
            task.cancel()

    def pause_writing(self) -> None:
        # The peer is not taking its answers: stop taking requests from it.
        self._write_blocked = True
        self._pause(_REPLIES)

    def resume_writing(self) -> None:
        self._write_blocked = False
        self.server._count_replies(self)
        if not self._replies_backlogged():
            self._resume(_REPLIES)

    # reading: one event at a time, while nothing says stop

    def _process(self) -> None:
        """Take events from the bytes received while this connection may."""
        handled = 0
        protocol = self.protocol
        while not self._paused:
            if handled >= EVENTS_PER_TURN and protocol.buffered:
                self._pause(_TURN)
                self.loop.call_soon(self._resume, _TURN)
                break
            if self._replies_backlogged():
                self._pause(_REPLIES)
                break
            event = protocol.next_event()
            if event is None:
                break
            handled += 1
            if isinstance(event, RequestReceived):
                self._start_call(event)
            elif isinstance(event, DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream._deliver(event.data)
                    if event.end_stream:
                        stream._deliver(None)
            else:
                self._reject(event)
        if not self._paused:
            self._reserve_frame_room()
        self._watch_frame()

    def _pause(self, reason: str) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused.add(reason)

    def _resume(self, reason: str) -> None:
        if reason not in self._paused:
            return
        self._paused.discard(reason)
        if self._paused or self.transport is None or self.transport.is_closing():
            return
        self.transport.resume_reading()
        self._process()

    def _reserve_frame_room(self) -> None:
        """A frame bigger than the guaranteed bytes needs room in the shared pool,
        all of it before more of it is read: a connection holding room can
        always finish its frame (no two waiting on each other), and one that
        cannot get it waits holding no more than its guaranteed bytes."""
        need = max(0, self.protocol.frame_size - self.limits.guaranteed_frame_bytes)
        if need == self.reserved:
            return
        server = self.server
        if need < self.reserved:
            server._release_frame_room(self, keep=need)
        elif server._frame_waiters or not server._take_frame_room(self, need):
            self._pause(_FRAMES)  # first come, first served: behind those already waiting
            server._frame_waiters[self] = None

    def _take_room_for_frame(self) -> bool:
        need = max(0, self.protocol.frame_size - self.limits.guaranteed_frame_bytes)
        return self.server._take_frame_room(self, need)

    def _watch_frame(self) -> None:
        """A frame that has started must end within frame_timeout of when we
        let it come: not counting a wait for room (holding only guaranteed
        bytes), while holding room or not reading answers counts."""
        if _FRAMES in self._paused or not self.protocol.in_frame():
            self._cancel_frame_timer()
            return
        frame = self.protocol.frames
        if self._frame_timer is None or self._timed_frame != frame:
            self._cancel_frame_timer()
            self._timed_frame = frame
            self._frame_timer = self.loop.call_later(self.limits.frame_timeout, self._frame_expired)

    def _cancel_frame_timer(self) -> None:
        if self._frame_timer is not None:
            self._frame_timer.cancel()
            self._frame_timer = None

    def _frame_expired(self) -> None:
        self._frame_timer = None
        self.server.counters["frame_timeouts"] += 1
        self.server.warnings.warn(
            self.who,
            "closing connection: a frame begun %gs ago is still incomplete",
            self.limits.frame_timeout,
            held=self.protocol.buffered,
        )
        if self.transport is not None:
            self.transport.abort()

    # sending: while several calls are in flight, coalesce the frames produced
    # in one loop iteration into one write (one syscall instead of many)

    def send(self, *data: bytes) -> None:
        """Write `data`, pieces of frames in order (big ones are not joined: not copied)."""
        if len(self.tasks) <= 1 and not self._outbox:
            # The only call in flight: answer at once, no extra loop turn.
            self._write(data)
            return
        if not self._outbox:
            self.loop.call_soon(self._flush)
        self._outbox.extend(data)
        self._outbox_bytes += len(data[0]) if len(data) == 1 else sum(map(len, data))

    def _flush(self) -> None:
        data, size = self._outbox, self._outbox_bytes
        self._outbox = []
        self._outbox_bytes = 0
        # Small answers are joined (one buffer for the transport); big ones are not copied.
        self._write((b"".join(data),) if size < COALESCE_JOIN_LIMIT else data)
        if _REPLIES in self._paused and not self._replies_backlogged():
            self._resume(_REPLIES)

    def send_from_pipe(self, stream_id: int, head: bytes, pipe: int, size: int) -> None:
        """Write `head`, then `size` bytes waiting in `pipe`: spliced straight into
        the socket while nothing is queued before them; whatever cannot go now
        is read and queued in order, as any other write (a frame is never cut)."""
        if self._outbox:
            self._flush()
        transport = self.transport
        moved = 0
        if (
            self._socket is not None
            and transport is not None
            and not transport.is_closing()
            and not transport.get_write_buffer_size()
        ):
            self._make_room_for(stream_id, len(head) + size)
            sock = self._socket.fileno()
            written = write_now(sock, head)
            if written == len(head):
                moved = splice_now(pipe, sock, size)
            head = head[written:]
        try:
            rest = read_exactly(pipe, size - moved) if moved < size else b""
        except PipeShort as exc:
            # Bytes promised to the peer are not there: the frame cannot be finished.
            log.error(
                "closing connection: a frame promised %d bytes from a pipe that held %d",
                size,
                moved + exc.held,
            )
            if transport is not None:
                transport.abort()
            return
        counters = self.server.counters
        counters["pipe_bytes_spliced"] += moved
        counters["pipe_bytes_copied"] += len(rest)
        if head or rest:
            self._write([part for part in (head, rest) if part])
        else:
            self.server._count_replies(self)
            self.busy_poll.answered()

    def _make_room_for(self, stream_id: int, size: int) -> None:
        """A send buffer that holds a whole `size`-byte frame while the peer reads
        (bounded by the largest frame: 4 MiB), for as long as the call lasts."""
        self._splicing.add(stream_id)
        if self._send_buffer < size:
            if not self._send_buffer:
                self._send_buffer_before = send_buffer(self._socket)
            set_send_buffer(self._socket, size)
            self._send_buffer = size

    def _lower_send_buffer(self, stream_id: int) -> None:
        """Once no call splices any more: the kernel memory a connection may pin
        with answers its peer does not read is back to what it was."""
        self._splicing.discard(stream_id)
        if not self._splicing and self._send_buffer and self._socket is not None:
            with contextlib.suppress(OSError):  # (the connection is gone)
                set_send_buffer(self._socket, self._send_buffer_before)
            self._send_buffer = 0

    def _write(self, data: Sequence[bytes]) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            if len(data) == 1:
                self.transport.write(data[0])
            else:
                # One writev on uvloop; the selector loop joins them (a copy) before 3.12.
                self.transport.writelines(data)
            self.server._count_replies(self)
            self.busy_poll.answered()

    def _replies_backlogged(self) -> bool:
        if self._write_blocked:
            return True
        transport = self.transport
        queued = transport.get_write_buffer_size() if transport is not None else 0
        return queued + self._outbox_bytes > self.limits.reply_high_water

    def _answer(
        self, stream_id: int, status: status_pb2.Status, payload: Sequence[bytes] | bytes = b""
    ) -> None:
        parts = (payload,) if isinstance(payload, bytes) else payload
        try:
            frame = self.protocol.response_parts(stream_id, status, parts)
        except FrameTooLarge:
            size = sum(len(part) for part in parts)
            status = status_pb2.Status(code=Code.RESOURCE_EXHAUSTED, message=oversize_message(size))
            frame = self.protocol.response_parts(stream_id, status, ())
        self.send(*frame)

    def _reject(self, event: StreamRejected) -> None:
        self.server.counters["streams_rejected"] += 1
        self.server.warnings.warn(
            self.who,
            "stream rejected: %s",
            event.message,
            stream=event.stream_id,
            code=event.code.name,
        )
        self.send(self.protocol.rejection(event))

    # calls

    def _start_call(self, event: RequestReceived) -> None:
        request = event.request
        sid = event.stream_id
        if self.server._draining:
            status = status_pb2.Status(code=Code.UNAVAILABLE, message="server is shutting down")
            self._answer(sid, status)
            return
        shared = len(self.tasks) >= self.limits.guaranteed_calls
        if shared and self.server._shared_calls >= self.limits.max_calls:
            message = (
                f"too many calls in flight on the server (limit {self.limits.max_calls} "
                f"beyond {self.limits.guaranteed_calls} per connection)"
            )
            self.server.counters["calls_refused"] += 1
            self.server.warnings.warn(self.who, "call refused: %s", message, stream=sid)
            self._answer(sid, status_pb2.Status(code=Code.RESOURCE_EXHAUSTED, message=message))
            return
        # Lookup and decoding failures answer as ttrpc-rust does (the Kata agent's
        # library): INVALID_ARGUMENT for an unknown service, UNIMPLEMENTED for an
        # unknown method, UNKNOWN for a payload that does not decode.
        methods = self.server._methods.get(request.service)
        if methods is None and request.service in self.server._lazy:
            try:
                methods = self.server._load(request.service)
            except Exception as exc:
                log.error("cannot load service %s: %r", request.service, exc, exc_info=exc)
                message = f"cannot load service {request.service}: {exc}"
                self._answer(sid, status_pb2.Status(code=Code.INTERNAL, message=message))
                return
        if methods is None:
            status = status_pb2.Status(
                code=Code.INVALID_ARGUMENT, message=f"unknown service {request.service}"
            )
            self._answer(sid, status)
            return
        method = methods.get(request.method)
        if method is None:
            message = f"method {request.service}/{request.method} is not implemented"
            self._answer(sid, status_pb2.Status(code=Code.UNIMPLEMENTED, message=message))
            return
        metadata: dict[str, list[str]] = {}
        if request.metadata:
            for kv in request.metadata:
                metadata.setdefault(kv.key, []).append(kv.value)
        timeout = request.timeout_nano / 1e9 if request.timeout_nano > 0 else None
        ctx = ServerContext(request.service, request.method, sid, metadata, timeout, self.peer)
        work: Awaitable[Sequence[bytes] | bytes | None]
        if isinstance(method, UnaryMethod):
            work = self._decode_and_handle(method, request.payload, ctx)
        else:
            stream = ServerStream(self, sid, self.limits.stream_buffer_bytes)
            if not event.streaming:
                stream._deliver(request.payload)
                stream._deliver(None)
            self.streams[sid] = stream
            work = self._handle_stream(method, stream, ctx)
        self.tasks[sid] = self.loop.create_task(self._run(ctx, work))
        self.server.calls += 1
        if shared:
            self.server._shared_calls += 1

    async def _decode_and_handle(
        self, method: UnaryMethod, payload: bytes, ctx: ServerContext
    ) -> Sequence[bytes]:
        try:
            request = method.request_type.FromString(payload)
        except DecodeError as exc:
            raise TtrpcError(
                Code.UNKNOWN, f"cannot decode {method.request_type.DESCRIPTOR.full_name}: {exc}"
            ) from None
        del payload  # decoded: a call that waits long must not hold its bytes twice
        response = await method.handler(request, ctx)  # the interceptors, then the handler
        if type(response) is EncodedResponse:
            return response.parts
        return (response.SerializeToString(),)

    async def _handle_stream(
        self, method: StreamMethod, stream: ServerStream, ctx: ServerContext
    ) -> bytes | None:
        # Called here, in the call's task: what the chain raises fails this call only.
        return await method.handler(stream, ctx)

    async def _run(
        self, ctx: ServerContext, work: Awaitable[Sequence[bytes] | bytes | None]
    ) -> None:
        """Run one call to its end and answer it, whatever happens."""
        status: status_pb2.Status = _OK
        body: Sequence[bytes] | bytes = b""
        deadline: asyncio.Timeout | None = None
        try:
            if ctx.timeout is None:
                body = await work or b""
            else:
                async with asyncio.timeout(ctx.timeout) as deadline:
                    body = await work or b""
        except BaseException as exc:
            expired = deadline is not None and deadline.expired()
            stream = self.streams.get(ctx.stream_id)
            if stream is not None and stream.overrun:
                status = stream.overrun_status()
                return
            status = self._failure(exc, ctx, expired)
            if isinstance(exc, asyncio.CancelledError) and not expired:
                raise
        finally:
            self._answer(ctx.stream_id, status, body)
            self._call_done(ctx, status)

    def _end_overrun(self, stream_id: int) -> None:
        """A streaming call whose client sent past its buffer: cancelled, and answered
        RESOURCE_EXHAUSTED (see _run)."""
        task = self.tasks.get(stream_id)
        if task is not None:
            task.cancel()

    def _call_done(self, ctx: ServerContext, status: status_pb2.Status) -> None:
        if self.tasks.pop(ctx.stream_id, None) is not None:
            self.server.calls -= 1
            if len(self.tasks) >= self.limits.guaranteed_calls:
                self.server._shared_calls -= 1
        self.streams.pop(ctx.stream_id, None)
        if self._splicing:
            self._lower_send_buffer(ctx.stream_id)
        if not self.tasks:
            self.server._maybe_idle()
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "call",
                extra={
                    "call": f"{ctx.service}/{ctx.method}",
                    "stream": ctx.stream_id,
                    "code": Code.from_wire(status.code).name,
                },
            )

    def _failure(
        self, exc: BaseException, ctx: ServerContext, deadline_expired: bool
    ) -> status_pb2.Status:
        call = f"{ctx.service}/{ctx.method}"
        if deadline_expired:
            return status_pb2.Status(
                code=Code.DEADLINE_EXCEEDED,
                message=f"{call} did not finish within its {ctx.timeout:g}s deadline",
            )
        if isinstance(exc, TtrpcError):
            return exc.to_status()
        if isinstance(exc, asyncio.CancelledError):
            return status_pb2.Status(
                code=Code.CANCELLED, message=f"{call} cancelled: server shutting down"
            )
        log.error("%s failed: %r", call, exc, exc_info=exc)
        return status_pb2.Status(code=Code.INTERNAL, message=f"{call}: {exc}")


class Server:
    """Serve services on one or more addresses.

    >>> server = Server([Service.from_descriptor(health_descriptor, HealthImpl())])
    >>> await server.start("unix:///run/agent.sock")
    >>> await server.shutdown(grace=5)

    `interceptors` run around every unary call, the first outermost, once its
    request is decoded: `await interceptor(request, ctx, handler)`;
    `stream_interceptors` likewise around streaming calls, with the stream in
    place of the request. One that raises fails the call, with the status of
    its TtrpcError (INTERNAL for any other exception).

    `busy_poll` (seconds, 0 = off): after an answer, keep the event loop polling
    this long for the next request rather than sleeping (see busypoll).
    """

    def __init__(
        self,
        services: Iterable[Service | LazyService] = (),
        *,
        interceptors: Sequence[UnaryServerInterceptor] = (),
        stream_interceptors: Sequence[StreamServerInterceptor] = (),
        limits: Limits | None = None,
        busy_poll: float = 0.0,
    ) -> None:
        if busy_poll < 0:
            raise ValueError(f"busy_poll must not be negative, got {busy_poll!r}")
        self.interceptors = tuple(interceptors)
        #: Seconds the event loop keeps polling after an answer (see busypoll); 0: off.
        self.busy_poll = busy_poll
        self._busy_polls: dict[asyncio.AbstractEventLoop, BusyPoll] = {}
        self.stream_interceptors = tuple(stream_interceptors)
        self.limits = limits or Limits()
        self._services: dict[str, Service] = {}
        #: Per service, its methods as called: each handler behind the interceptors.
        self._methods: dict[str, dict[str, UnaryMethod | StreamMethod]] = {}
        #: Services not loaded yet (LazyService), by name.
        self._lazy: dict[str, Callable[[], Service]] = {}
        for service in services:
            self.add_service(service)
        self._listeners: list[Listener] = []
        self._connections: set[_Connection] = set()
        self._draining = False
        self._idle: asyncio.Event | None = None
        #: Calls in flight on every connection.
        self.calls = 0
        #: Of those, calls beyond each connection's guaranteed ones.
        self._shared_calls = 0
        #: How often each bound was hit, since the server was made.
        self.counters: collections.Counter[str] = collections.Counter()
        self.warnings = _PeerWarnings(self.limits)
        # One read buffer for every connection: the loop reads one socket at a
        # time and buffer_updated copies what it needs before the next read.
        self._read_buffer = memoryview(bytearray(READ_SIZE))
        #: Bytes of the shared room for incomplete frames reserved.
        self._frame_room_reserved = 0
        #: Connections waiting for room for their frame, first come first served.
        self._frame_waiters: dict[_Connection, None] = {}
        self._waking: asyncio.Handle | None = None
        #: Answer bytes queued on all connections (as last counted), and who has some.
        self._queued_replies = 0
        self._backlogged: set[_Connection] = set()

    def _busy_poll_on(self, loop: asyncio.AbstractEventLoop) -> BusyPoll:
        """The loop's poller: one per loop, shared by its connections."""
        poll = self._busy_polls.get(loop)
        if poll is None:
            poll = self._busy_polls[loop] = BusyPoll(loop, self.busy_poll)
        return poll

    def stats(self) -> dict[str, int]:
        """What the server holds now, and how often each bound was hit."""
        return {
            "connections": len(self._connections),
            "calls": self.calls,
            "frame_bytes": sum(conn.protocol.buffered for conn in self._connections),
            "frame_bytes_reserved": self._frame_room_reserved,
            "queued_reply_bytes": sum(
                conn.transport.get_write_buffer_size() + conn._outbox_bytes
                for conn in self._connections
                if conn.transport is not None
            ),
            "raised_send_buffers": sum(1 for conn in self._connections if conn._send_buffer),
            **self.counters,
        }

    def add_service(self, service: Service | LazyService) -> None:
        """Serve `service`: the methods it has now, each behind the interceptors
        (a LazyService: once its first call has loaded it)."""
        if service.name in self._services or service.name in self._lazy:
            raise ValueError(f"service {service.name} is already registered")
        if isinstance(service, LazyService):
            self._lazy[service.name] = service.load
            return
        self._services[service.name] = service
        self._methods[service.name] = {
            name: self._intercepted(method) for name, method in service.methods.items()
        }

    def _load(self, name: str) -> dict[str, UnaryMethod | StreamMethod]:
        """The methods of the lazy service `name`, loaded now (its first call)."""
        load = self._lazy.pop(name)
        try:
            service = load()
            if service.name != name:
                raise ValueError(f"loading service {name} made service {service.name}")
        except BaseException:
            self._lazy[name] = load  # the next call tries again
            raise
        self.add_service(service)
        return self._methods[name]

    def _intercepted(self, method: UnaryMethod | StreamMethod) -> UnaryMethod | StreamMethod:
        # The chain is built once per method, not per call.
        if isinstance(method, UnaryMethod):
            if not self.interceptors:
                return method
            return replace(method, handler=chain(self.interceptors, method.handler))
        if not self.stream_interceptors:
            return method
        return replace(method, handler=chain(self.stream_interceptors, method.handler))

    @property
    def services(self) -> Mapping[str, Service]:
        return self._services

    @property
    def addresses(self) -> list[Address]:
        return [listener.address for listener in self._listeners]

    async def start(self, address: str | Address, *, start_serving: bool = True) -> Listener:
        """Listen on `address`; may be called again for more addresses.

        `start_serving=False`: ready, but no client is served before the listener's
        `start_serving()` (the agent parked for a snapshot: agent/restore.py).
        """
        holder: list[Listener] = []
        # A serial port makes its first connection inside listen(), before the
        # listener exists; a port admits every client anyway (there is no peer to check).
        listener = await transport_mod.listen(
            address,
            lambda: _Connection(self, holder[0] if holder else None),
            boundaries=ClientBoundaries,
            start_serving=start_serving,
        )
        holder.append(listener)
        self._listeners.append(listener)
        return listener

    def connection_protocol(self) -> asyncio.BaseProtocol:
        """A protocol for a connection made elsewhere (e.g. a socketpair in tests)."""
        return _Connection(self, None)

    def _in_flight(self) -> int:
        return self.calls

    def _maybe_idle(self) -> None:
        if self._idle is not None and self.calls == 0:
            self._idle.set()

    # incomplete frames: each connection's own allowance, then a shared room

    def _take_frame_room(self, conn: _Connection, need: int) -> bool:
        extra = need - conn.reserved
        if self._frame_room_reserved + extra > self.limits.max_frame_bytes:
            return False
        self._frame_room_reserved += extra
        conn.reserved = need
        return True

    def _release_frame_room(self, conn: _Connection, keep: int = 0) -> None:
        if conn.reserved <= keep:
            return
        self._frame_room_reserved -= conn.reserved - keep
        conn.reserved = keep
        if self._frame_waiters and self._waking is None:
            self._waking = asyncio.get_running_loop().call_soon(self._wake_frame_waiters)

    def _wake_frame_waiters(self) -> None:
        """There is room again: waiting connections get it in the order they came;
        the first that does not fit keeps its place (big frames are not starved)."""
        self._waking = None
        for conn in list(self._frame_waiters):
            if not conn._take_room_for_frame():
                break
            del self._frame_waiters[conn]
            conn._resume(_FRAMES)

    # answers queued for peers that do not take them

    def _count_replies(self, conn: _Connection) -> None:
        transport = conn.transport
        queued = transport.get_write_buffer_size() if transport is not None else 0
        if queued == conn.queued:
            return
        self._queued_replies += queued - conn.queued
        conn.queued = queued
        if queued:
            self._backlogged.add(conn)
        else:
            self._backlogged.discard(conn)
        if self._queued_replies > self.limits.max_queued_replies:
            self._shed_replies()

    def _forget_replies(self, conn: _Connection) -> None:
        self._queued_replies -= conn.queued
        conn.queued = 0
        self._backlogged.discard(conn)

    def _shed_replies(self) -> None:
        """Over the bound for all connections: close those holding the most."""
        for conn in list(self._backlogged):  # the counts may be stale: buffers drain
            self._count_replies_exactly(conn)
        while self._queued_replies > self.limits.max_queued_replies and self._backlogged:
            worst = max(self._backlogged, key=lambda conn: conn.queued)
            self.counters["connections_shed"] += 1
            self.warnings.warn(
                worst.who,
                "closing connection: its peer does not take its answers "
                "(%d bytes queued; all connections together may hold %d)",
                worst.queued,
                self.limits.max_queued_replies,
            )
            self._forget_replies(worst)
            if worst.transport is not None:
                worst.transport.abort()

    def _count_replies_exactly(self, conn: _Connection) -> None:
        transport = conn.transport
        queued = transport.get_write_buffer_size() if transport is not None else 0
        self._queued_replies += queued - conn.queued
        conn.queued = queued
        if not queued:
            self._backlogged.discard(conn)

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop accepting; let in-flight calls finish for up to `grace` seconds.

        Calls still running then are cancelled (their clients get CANCELLED);
        new calls on open connections get UNAVAILABLE meanwhile. Socket files
        are removed.
        """
        self._draining = True
        for listener in self._listeners:
            listener.close()
        self._idle = asyncio.Event()
        self._maybe_idle()
        if not self._idle.is_set():
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except TimeoutError:
                log.warning(
                    "%d call(s) still running after %gs; cancelling", self._in_flight(), grace
                )
        tasks = [task for conn in self._connections for task in conn.tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in list(self._connections):
            conn._flush()
            if conn.transport is not None:
                conn.transport.close()
        # A peer that does not take its last answers must not hold the shutdown.
        for _ in range(20):
            if not self._connections:
                break
            await asyncio.sleep(0.05)
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.abort()
        self.warnings.close()
        for poll in self._busy_polls.values():
            poll.close()
        for listener in self._listeners:
            await listener.wait_closed()
        self._listeners.clear()
