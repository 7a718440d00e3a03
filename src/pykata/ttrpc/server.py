"""An asyncio ttRPC server: services registered by name, one task per call.

The wire rules live in protocol.ServerConnection; this module only moves
bytes between it and a socket and runs handlers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, cast

from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2

from .. import transport as transport_mod
from ..transport import Address, Listener
from .frame import FrameTooLarge
from .protocol import (
    DataReceived,
    RequestReceived,
    ServerConnection,
    StreamRejected,
    oversize_message,
)
from .status import Code, TtrpcError

log = logging.getLogger("pykata.ttrpc.server")

_OK = status_pb2.Status(code=Code.OK)


@dataclass(slots=True)
class ServerContext:
    """What a handler may know about its call besides the request."""

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


UnaryHandler = Callable[[Any, ServerContext], Awaitable[Message]]
CallHook = Callable[[ServerContext, Message], AbstractContextManager[None]]


class ServerStream:
    """Both directions of a streaming call, as raw payloads."""

    def __init__(self, conn: _Connection, stream_id: int) -> None:
        self._conn = conn
        self._stream_id = stream_id
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def recv(self) -> bytes | None:
        """The next message from the client; None once it has closed its side."""
        return await self._inbox.get()

    def send(self, payload: bytes) -> None:
        self._conn.send(self._conn.protocol.data(self._stream_id, payload))

    def _deliver(self, payload: bytes | None) -> None:
        self._inbox.put_nowait(payload)


StreamHandler = Callable[[ServerStream, ServerContext], Coroutine[Any, Any, bytes | None]]


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


class _Connection(asyncio.Protocol):
    def __init__(self, server: Server, listener: Listener | None) -> None:
        self.server = server
        self.listener = listener
        self.protocol = ServerConnection()
        # Kept, not looked up per call: on 3.11 each lookup costs a getpid() syscall.
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.streams: dict[int, ServerStream] = {}
        self.peer: tuple[int, int, int] | None = None
        self._outbox: list[bytes] = []

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer = transport_mod.peer_credentials(transport)
        if self.listener is not None and not self.listener.admits(transport):
            log.warning(
                "refused connection from a peer of another user on %s",
                self.listener.address,
                extra={"peer_pid_uid_gid": self.peer},
            )
            self.transport.abort()
            return
        self.server._connections.add(self)

    def data_received(self, data: bytes) -> None:
        for event in self.protocol.receive(data):
            if isinstance(event, RequestReceived):
                self._start_call(event)
            elif isinstance(event, DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream._deliver(event.data)
                    if event.end_stream:
                        stream._deliver(None)
            elif isinstance(event, StreamRejected):
                log.warning("stream rejected: %s", event.message, extra={"stream": event.stream_id})
                self._answer(
                    event.stream_id, status_pb2.Status(code=event.code, message=event.message)
                )

    def eof_received(self) -> bool:
        if not self.protocol.end_of_input_is_clean():
            log.warning("connection closed in the middle of a frame; dropping it")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        for task in self.tasks.values():
            task.cancel()

    def pause_writing(self) -> None:
        # The peer is not reading its answers: stop taking new requests from it.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # sending: while several calls are in flight, coalesce the frames produced
    # in one loop iteration into one write (one syscall instead of many)

    def send(self, data: bytes) -> None:
        if len(self.tasks) <= 1 and not self._outbox:
            # The only call in flight: answer at once, no extra loop turn.
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(data)
            return
        if not self._outbox:
            self.loop.call_soon(self._flush)
        self._outbox.append(data)

    def _flush(self) -> None:
        data = b"".join(self._outbox)
        self._outbox.clear()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _answer(self, stream_id: int, status: status_pb2.Status, payload: bytes = b"") -> None:
        try:
            frame = self.protocol.response(stream_id, status, payload)
        except FrameTooLarge:
            status = status_pb2.Status(
                code=Code.RESOURCE_EXHAUSTED, message=oversize_message(len(payload))
            )
            frame = self.protocol.response(stream_id, status)
        self.send(frame)

    # calls

    def _start_call(self, event: RequestReceived) -> None:
        request = event.request
        sid = event.stream_id
        if self.server._draining:
            status = status_pb2.Status(code=Code.UNAVAILABLE, message="server is shutting down")
            self._answer(sid, status)
            return
        # Lookup and decoding failures answer as ttrpc-rust does (the Kata agent's
        # library): INVALID_ARGUMENT for an unknown service, UNIMPLEMENTED for an
        # unknown method, UNKNOWN for a payload that does not decode.
        service = self.server._services.get(request.service)
        if service is None:
            status = status_pb2.Status(
                code=Code.INVALID_ARGUMENT, message=f"unknown service {request.service}"
            )
            self._answer(sid, status)
            return
        method = service.methods.get(request.method)
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
        work: Coroutine[Any, Any, bytes | None]
        if isinstance(method, UnaryMethod):
            work = self._decode_and_handle(method, request.payload, ctx)
        else:
            stream = ServerStream(self, sid)
            if not event.streaming:
                stream._deliver(request.payload)
                stream._deliver(None)
            self.streams[sid] = stream
            work = method.handler(stream, ctx)
        self.tasks[sid] = self.loop.create_task(self._run(ctx, work))

    async def _decode_and_handle(
        self, method: UnaryMethod, payload: bytes, ctx: ServerContext
    ) -> bytes:
        try:
            request = method.request_type.FromString(payload)
        except DecodeError as exc:
            raise TtrpcError(
                Code.UNKNOWN, f"cannot decode {method.request_type.DESCRIPTOR.full_name}: {exc}"
            ) from None
        del payload  # decoded: a call that waits long must not hold its bytes twice
        hook = self.server.call_hook
        if hook is None:
            response = await method.handler(request, ctx)
        else:
            with hook(ctx, request):
                response = await method.handler(request, ctx)
        return response.SerializeToString()

    async def _run(self, ctx: ServerContext, work: Coroutine[Any, Any, bytes | None]) -> None:
        """Run one call to its end and answer it, whatever happens."""
        status, body = _OK, b""
        deadline: asyncio.Timeout | None = None
        try:
            if ctx.timeout is None:
                body = await work or b""
            else:
                async with asyncio.timeout(ctx.timeout) as deadline:
                    body = await work or b""
        except BaseException as exc:
            expired = deadline is not None and deadline.expired()
            status = self._failure(exc, ctx, expired)
            if isinstance(exc, asyncio.CancelledError) and not expired:
                raise
        finally:
            self._answer(ctx.stream_id, status, body)
            self._call_done(ctx, status)

    def _call_done(self, ctx: ServerContext, status: status_pb2.Status) -> None:
        self.tasks.pop(ctx.stream_id, None)
        self.streams.pop(ctx.stream_id, None)
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
    """

    def __init__(
        self, services: Iterable[Service] = (), *, call_hook: CallHook | None = None
    ) -> None:
        #: Wraps every unary handler call, e.g. in a tracing span: hook(ctx, request).
        self.call_hook = call_hook
        self._services: dict[str, Service] = {}
        for service in services:
            self.add_service(service)
        self._listeners: list[Listener] = []
        self._connections: set[_Connection] = set()
        self._draining = False
        self._idle: asyncio.Event | None = None

    def add_service(self, service: Service) -> None:
        if service.name in self._services:
            raise ValueError(f"service {service.name} is already registered")
        self._services[service.name] = service

    @property
    def services(self) -> Mapping[str, Service]:
        return self._services

    @property
    def addresses(self) -> list[Address]:
        return [listener.address for listener in self._listeners]

    async def start(self, address: str | Address) -> Listener:
        """Listen on `address`; may be called again for more addresses."""
        holder: list[Listener] = []
        listener = await transport_mod.listen(
            address, lambda: _Connection(self, holder[0]), ttrpc=True
        )
        holder.append(listener)
        self._listeners.append(listener)
        return listener

    def connection_protocol(self) -> asyncio.Protocol:
        """A protocol for a connection made elsewhere (e.g. a socketpair in tests)."""
        return _Connection(self, None)

    def _in_flight(self) -> int:
        return sum(len(conn.tasks) for conn in self._connections)

    def _maybe_idle(self) -> None:
        if self._idle is not None and self._in_flight() == 0:
            self._idle.set()

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
        for listener in self._listeners:
            await listener.wait_closed()
        self._listeners.clear()
