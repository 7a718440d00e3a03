"""An asyncio ttRPC client: many calls in flight on one connection."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar, cast

from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from .. import transport as transport_mod
from ..transport import Address
from .frame import FrameTooLarge
from .interceptor import chain
from .protocol import ClientConnection, DataReceived, ResponseReceived, data_frame_parts
from .status import Code, TtrpcError

M = TypeVar("M", bound=Message)
Metadata = Mapping[str, str | Iterable[str]]


@dataclass(slots=True)
class ClientContext:
    """A unary call as client interceptors see it, before it is sent: they may
    change its metadata and timeout."""

    service: str
    method: str
    #: Request metadata; a key may carry several values.
    metadata: dict[str, list[str]]
    #: Seconds the caller waits for the answer (also the server's deadline); None: no limit.
    timeout: float | None


#: The rest of a client chain: `await invoker(request, ctx)` sends the call.
Invoker = Callable[[Any, ClientContext], Awaitable[Any]]
#: Runs around a unary call: `await interceptor(request, ctx, invoker)`, where the
#: request is the message given to Client.call (bytes for call_raw) and so is the answer.
UnaryClientInterceptor = Callable[[Any, ClientContext, Invoker], Awaitable[Any]]


def _metadata_pairs(metadata: Metadata | None) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            pairs.append((key, value))
        else:
            pairs.extend((key, v) for v in value)
    return pairs


def _metadata_lists(metadata: Metadata | None) -> dict[str, list[str]]:
    return {
        key: [value] if isinstance(value, str) else list(value)
        for key, value in (metadata or {}).items()
    }


def _timeout_nano(timeout: float | None) -> int:
    return int(timeout * 1e9) if timeout else 0


def _decode(response_type: type[M], payload: bytes, service: str, method: str) -> M:
    try:
        return response_type.FromString(payload)
    except DecodeError as exc:
        expected = response_type.DESCRIPTOR.full_name
        raise TtrpcError(
            Code.INTERNAL, f"cannot decode {expected} from {service}/{method}: {exc}"
        ) from None


class ClientStream:
    """A streaming call: send and receive raw payloads, then the final status."""

    def __init__(self, client: Client, stream_id: int) -> None:
        self._client = client
        self.stream_id = stream_id
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._response: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def send(self, payload: bytes) -> None:
        self._client._write(self._client._protocol.data(self.stream_id, payload))

    def send_parts(self, head: bytes, data: bytes) -> None:
        """Send the payload `head` + `data` without joining them (a big `data` is
        not copied on its way to the socket)."""
        self._client._write_parts(data_frame_parts(self.stream_id, head, data))

    def close_send(self) -> None:
        self._client._write(self._client._protocol.data(self.stream_id, None, end_stream=True))

    async def recv(self) -> bytes | None:
        """The next data message from the server; None when its response has come."""
        if not self._inbox.empty():
            return self._inbox.get_nowait()
        if self._response.done():
            return None
        getter = asyncio.ensure_future(self._inbox.get())
        waiting: list[asyncio.Future[Any]] = [getter, self._response]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()
        return None

    async def response(self) -> bytes:
        """The final response payload; raises TtrpcError for a failed status."""
        return await self._response

    @property
    def finished(self) -> bool:
        """The server has answered (or the connection is lost)."""
        return self._response.done()


class Client:
    """A connection to a ttRPC server.

    >>> client = await Client.connect("unix:///run/agent.sock")
    >>> reply = await client.call("grpc.Health", "Check", CheckRequest(), HealthCheckResponse)

    `interceptors` run around every unary call (call, call_raw, Stub), the first
    outermost; the list may be changed between calls. Streams are not intercepted.
    """

    def __init__(self, *, interceptors: Iterable[UnaryClientInterceptor] = ()) -> None:
        self.interceptors: list[UnaryClientInterceptor] = list(interceptors)
        self._protocol = ClientConnection()
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._streams: dict[int, ClientStream] = {}
        self._lost: TtrpcError | None = None
        self._closed = asyncio.get_running_loop().create_future()
        self.address: Address | None = None

    @classmethod
    async def connect(
        cls,
        address: str | Address,
        *,
        timeout: float | None = 10.0,
        interceptors: Iterable[UnaryClientInterceptor] = (),
    ) -> Client:
        address = transport_mod.as_address(address)
        client = cls(interceptors=interceptors)
        client.address = address
        await transport_mod.connect(address, lambda: _ClientProtocol(client), timeout=timeout)
        return client

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        await asyncio.shield(self._closed)

    async def wait_closed(self) -> None:
        """Until the connection is closed or lost."""
        await asyncio.shield(self._closed)

    @property
    def connected(self) -> bool:
        return self._transport is not None and self._lost is None

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> M:
        """One unary call. Raises TtrpcError for any failure, with its status code."""
        if self.interceptors:
            ctx = ClientContext(service, method, _metadata_lists(metadata), timeout)
            invoke = partial(self._invoke, response_type)
            return await chain(self.interceptors, invoke)(request, ctx)
        payload = await self._unary(
            service, method, request.SerializeToString(), timeout, _metadata_pairs(metadata)
        )
        return _decode(response_type, payload, service, method)

    async def call_raw(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> bytes:
        """One unary call with the request and answer payloads as bytes."""
        if self.interceptors:
            ctx = ClientContext(service, method, _metadata_lists(metadata), timeout)
            return await chain(self.interceptors, self._invoke_raw)(payload, ctx)
        return await self._unary(service, method, payload, timeout, _metadata_pairs(metadata))

    async def _invoke(self, response_type: type[M], request: Message, ctx: ClientContext) -> M:
        """The end of a client chain for call()."""
        payload = await self._invoke_raw(request.SerializeToString(), ctx)
        return _decode(response_type, payload, ctx.service, ctx.method)

    async def _invoke_raw(self, payload: bytes, ctx: ClientContext) -> bytes:
        """The end of a client chain for call_raw()."""
        pairs = _metadata_pairs(ctx.metadata)
        return await self._unary(ctx.service, ctx.method, payload, ctx.timeout, pairs)

    async def _unary(
        self,
        service: str,
        method: str,
        payload: bytes,
        timeout: float | None,
        metadata: list[tuple[str, str]],
    ) -> bytes:
        future = self._open(service, method, payload, timeout, metadata, streaming=False)[1]
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise TtrpcError(
                Code.DEADLINE_EXCEEDED, f"{service}/{method}: no answer within {timeout:g}s"
            ) from None

    def stream(
        self,
        service: str,
        method: str,
        payload: bytes | None = None,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> ClientStream:
        """Open a streaming call. With `payload`, the request side is that one message."""
        sid, future = self._open(
            service,
            method,
            payload or b"",
            timeout,
            _metadata_pairs(metadata),
            streaming=payload is None,
        )
        stream = ClientStream(self, sid)
        stream._response = future
        self._streams[sid] = stream
        return stream

    def _open(
        self,
        service: str,
        method: str,
        payload: bytes,
        timeout: float | None,
        metadata: list[tuple[str, str]],
        streaming: bool,
    ) -> tuple[int, asyncio.Future[bytes]]:
        if self._lost is not None:
            raise TtrpcError(self._lost.code, self._lost.message)
        try:
            sid, frame = self._protocol.request(
                service,
                method,
                payload,
                timeout_nano=_timeout_nano(timeout),
                metadata=metadata,
                streaming=streaming,
            )
        except FrameTooLarge as exc:
            raise TtrpcError(Code.RESOURCE_EXHAUSTED, f"{service}/{method}: {exc}") from None
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda _f: self._pending.pop(sid, None))
        self._pending[sid] = future
        self._write(frame)
        return sid, future

    def _write(self, data: bytes) -> None:
        if self._lost is not None:
            raise TtrpcError(self._lost.code, self._lost.message)
        assert self._transport is not None
        self._transport.write(data)

    def _write_parts(self, parts: list[bytes]) -> None:
        if self._lost is not None:
            raise TtrpcError(self._lost.code, self._lost.message)
        assert self._transport is not None
        self._transport.writelines(parts)

    # events from the connection

    def _received(self, nbytes: int) -> None:
        self._protocol.buffer_updated(nbytes)
        while (event := self._protocol.next_event()) is not None:
            if isinstance(event, ResponseReceived):
                self._streams.pop(event.stream_id, None)
                future = self._pending.get(event.stream_id)
                if future is None or future.done():
                    continue  # an answer nobody waits for any more (e.g. timed out)
                if event.status.code == Code.OK:
                    future.set_result(event.payload)
                else:
                    future.set_exception(TtrpcError.from_status(event.status))
            elif isinstance(event, DataReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None and event.data is not None:
                    stream._inbox.put_nowait(event.data)

    def _connection_lost(self, exc: Exception | None) -> None:
        cause = f": {exc}" if exc else ""
        if not self._protocol.end_of_input_is_clean():
            cause += " (in the middle of a frame)"
        self._lost = TtrpcError(Code.UNAVAILABLE, f"connection to {self.address} lost{cause}")
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(TtrpcError(self._lost.code, self._lost.message))
        self._pending.clear()
        if not self._closed.done():
            self._closed.set_result(None)


class _ClientProtocol(asyncio.BufferedProtocol):
    """Reads go where the decoder says: a big answer's data straight into the
    buffer it is handed out in (copied once, not read then joined)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._client._transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._client._protocol.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._client._received(nbytes)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._connection_lost(exc)


class Stub:
    """Calls a protobuf service by its descriptor: `await stub.Method(request, timeout=...)`.

    >>> agent = Stub(client, agent_pb2.DESCRIPTOR.services_by_name["AgentService"])
    >>> await agent.StartContainer(StartContainerRequest(container_id="c1"))
    """

    def __init__(self, client: Client, service: ServiceDescriptor) -> None:
        self._client = client
        self._service = service

    def __getattr__(self, name: str) -> Any:
        # Only reached once per method: the caller is then an attribute of the stub.
        method = self._service.methods_by_name.get(name)
        if method is None:
            raise AttributeError(f"{self._service.full_name} has no method {name}")
        response_type = message_factory.GetMessageClass(method.output_type)
        service_name = self._service.full_name

        async def call(
            request: Message, *, timeout: float | None = None, metadata: Metadata | None = None
        ) -> Message:
            return await self._client.call(
                service_name, name, request, response_type, timeout=timeout, metadata=metadata
            )

        setattr(self, name, call)
        return call
