"""The client end of pykata.Extensions: capabilities, and typed streams with
the same flow control as the agent's (flow.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from google.protobuf.message import DecodeError, Message

from ..api import extensions_pb2 as ext
from ..ttrpc import Client, ClientStream, Code, TtrpcError
from ..ttrpc.client import Metadata
from . import EXTENSIONS, SERVICE
from .flow import ReceiveWindow, Sending, SendWindow, WindowExceeded
from .pump import Pump
from .wire import data_field, data_tag

In = TypeVar("In", bound=Message)
M = TypeVar("M", bound=Message)
#: What a channel's recv() hands out: messages, and Pieces where it decodes them.
Received = TypeVar("Received")


@dataclass(frozen=True, slots=True)
class Piece:
    """An answer of the agent holding only data (Exec's stdout or stderr, a forward's
    or a download's data), decoded by hand (wire.py): the field's name, and its
    bytes - a view into the frame that brought them, not a copy."""

    field: str
    data: memoryview


#: Per answer type: its fields that carry data alone in a message.
DATA_FIELDS: dict[type[Message], tuple[str, ...]] = {
    ext.ExecOutput: ("stdout", "stderr"),
    ext.ForwardMessage: ("data",),
    ext.DownloadOutput: ("data",),
}


class MissingExtension(Exception):
    """The agent does not offer an extension this client needs (one line, for people)."""


class ProtocolError(Exception):
    """The agent broke the stream's protocol (flow control, message order)."""


def _acks(message: Message | Piece) -> int:
    """What an answer of the agent acknowledges (bytes)."""
    if isinstance(message, Piece):
        return 0
    if isinstance(message, ext.ForwardMessage | ext.UploadOutput):
        return message.ack
    if isinstance(message, ext.ExecOutput):
        return message.stdin_ack
    return 0


def _data(message: Message | Piece) -> int:
    """The data bytes an answer of the agent carries (Watch's events are not bytes)."""
    if isinstance(message, Piece):
        return len(message.data)
    if isinstance(message, ext.ForwardMessage | ext.DownloadOutput):
        return len(message.data)
    if isinstance(message, ext.ExecOutput):
        return len(message.stdout) + len(message.stderr)
    return 0


def _failure(exc: Exception) -> BaseException:
    if isinstance(exc, WindowExceeded):
        return ProtocolError(f"flow control: {exc}")
    return exc


class Channel(Sending, Generic[Received]):
    """A streaming call: typed messages both ways, and its windows. A task takes the
    agent's messages as they arrive (pump.py): acks are applied at once, data is
    counted against the window, and recv() hands them out in order. With
    `data_fields`, a message holding only one of them comes out as a Piece."""

    def __init__(
        self,
        stream: ClientStream,
        incoming: type[Message],
        window: int,
        data_fields: tuple[str, ...] = (),
        *,
        method: str = "the call",
    ) -> None:
        self.stream = stream
        self.raw = stream
        #: The RPC's name, for messages.
        self.method = method
        self._incoming = incoming
        self._data_tags = [(data_tag(incoming, name), name) for name in data_fields]
        self.send_window = SendWindow(window)
        self.receive_window = ReceiveWindow(window)
        self.send_closed = False
        # Awaited by finish(); retrieved here too, so a call given up on is not
        # reported as an error nobody saw.
        self._result = asyncio.ensure_future(stream.response())
        self._result.add_done_callback(lambda f: f.cancelled() or f.exception())
        # (_acks and _data take any message or Piece, whatever this channel hands out)
        acks, data = cast(Callable[[Received], int], _acks), cast(Callable[[Received], int], _data)
        self._pump: Pump[Received] = Pump(
            self._decoded, self.send_window, self.receive_window, acks, data, _failure
        )

    def close_send(self) -> None:
        """No more messages from us (the call goes on until the agent ends it)."""
        if not self.send_closed:
            self.send_closed = True
            self.stream.close_send()

    def abort(self) -> None:
        """Give up: our side closes at once; the agent ends the call and frees what it
        held (a call closed before its protocol's end fails, and that is all)."""
        if not self.stream.finished:
            with contextlib.suppress(TtrpcError):
                self.close_send()

    async def _decoded(self) -> Received | None:
        payload = await self.stream.recv()
        if payload is None:
            return None
        for tag, name in self._data_tags:
            data = data_field(payload, tag)
            if data is not None:
                return cast(Received, Piece(name, data))
        try:
            return cast(Received, self._incoming.FromString(payload))
        except DecodeError as exc:
            raise ProtocolError(f"not a {self._incoming.DESCRIPTOR.full_name}: {exc}") from None

    async def recv(self) -> Received | None:
        """The agent's next message (its ack and data already counted); None when the
        call has ended (then `finish()`)."""
        return await self._pump.recv()

    async def first(self, answer: type[M], field: str) -> M:
        """The agent's first answer, which must be `answer` with `field` set (ready,
        opened, exec_id); the agent's error if the call failed instead."""
        message = await self.recv()
        if message is None:
            await self.finish()  # raises the agent's error
            raise ProtocolError(f"{self.method} ended before its first answer")
        if not isinstance(message, answer) or not getattr(message, field):
            raise ProtocolError(f"{self.method}'s first answer has no {field!r}")
        return message

    async def finish(self) -> None:
        """Wait for the call's status; raises TtrpcError if it failed."""
        await asyncio.shield(self._result)


class Extensions:
    """pykata.Extensions on a connected Client."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._capabilities: ext.Capabilities | None = None

    async def capabilities(self) -> ext.Capabilities:
        """The agent's answer to GetCapabilities (asked once); MissingExtension for an
        agent without the service (upstream's, or an older pykata)."""
        if self._capabilities is None:
            try:
                self._capabilities = await self.client.call(
                    SERVICE, "GetCapabilities", ext.CapabilitiesRequest(), ext.Capabilities
                )
            except TtrpcError as exc:
                if exc.code in (Code.INVALID_ARGUMENT, Code.UNIMPLEMENTED) and (
                    "unknown service" in exc.message or "not implemented" in exc.message
                ):
                    raise MissingExtension(
                        f"the agent at {self.client.address} has no {SERVICE} service "
                        "(an upstream Kata agent?): extensions need pykata's agent"
                    ) from None
                raise
        return self._capabilities

    async def require(self, name: str) -> ext.Capabilities:
        """The capabilities, if the agent offers `name` at our version; else MissingExtension."""
        caps = await self.capabilities()
        offered = {e.name: e.version for e in caps.extensions}
        if name not in offered:
            raise MissingExtension(
                f"the agent (version {caps.agent_version}) does not offer {name}; it offers: "
                f"{', '.join(sorted(offered)) or 'nothing'}"
            )
        if offered[name] != EXTENSIONS[name]:
            raise MissingExtension(
                f"the agent offers {name} version {offered[name]}, this tool speaks "
                f"version {EXTENSIONS[name]}"
            )
        return caps

    async def open(
        self, name: str, incoming: type[In], *, metadata: Metadata | None = None
    ) -> Channel[In]:
        """A streaming call of `name` (after require()); `metadata` goes with it
        (a W3C traceparent makes the agent's span a child of the caller's)."""
        caps = await self.require(name)
        stream = self.client.stream(SERVICE, name, metadata=metadata)
        return Channel(stream, incoming, caps.limits.window_bytes, method=name)

    async def open_data(
        self, name: str, incoming: type[In], *, metadata: Metadata | None = None
    ) -> Channel[In | Piece]:
        """As open(), with the answers that hold only data (DATA_FIELDS) as Pieces:
        their bytes are not copied out of a message."""
        caps = await self.require(name)
        stream = self.client.stream(SERVICE, name, metadata=metadata)
        return Channel(
            stream, incoming, caps.limits.window_bytes, DATA_FIELDS[incoming], method=name
        )
