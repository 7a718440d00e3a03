"""One streaming call of pykata.Extensions as the agent sees it: typed messages
both ways, and the flow-control windows (extensions.flow) kept for it. A
task takes the client's messages as they arrive (extensions.pump), so its
acknowledgements never wait behind data the handler has not consumed yet."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from google.protobuf.message import DecodeError, Message

from ..extensions.flow import AckBeyondSent, ReceiveWindow, Sending, SendWindow, WindowOverrun
from ..extensions.pump import Pump
from ..extensions.wire import data_head
from ..ttrpc import ServerStream, TtrpcError
from .errors import InvalidArgument, LimitExceeded

In = TypeVar("In", bound=Message)


def _none(message: Message) -> int:
    return 0


def _failure(exc: Exception) -> BaseException:
    if isinstance(exc, WindowOverrun):
        return LimitExceeded(f"flow control: {exc}")
    if isinstance(exc, AckBeyondSent):
        return InvalidArgument(f"flow control: {exc}")
    if isinstance(exc, TtrpcError):
        return exc
    return InvalidArgument(str(exc))


class Channel(Sending, Generic[In]):
    """`ack_of`: the bytes a message acknowledges; `data_of`: the data bytes it carries."""

    def __init__(
        self,
        stream: ServerStream,
        incoming: type[In],
        window: int,
        *,
        ack_of: Callable[[In], int] = _none,
        data_of: Callable[[In], int] = _none,
    ) -> None:
        self._stream = stream
        self.raw = stream
        self._incoming = incoming
        #: What we may send before the client acknowledges.
        self.send_window = SendWindow(window)
        #: What the client may send before we acknowledge.
        self.receive_window = ReceiveWindow(window)
        self._pump = Pump(
            self._decoded, self.send_window, self.receive_window, ack_of, data_of, _failure
        )

    async def _decoded(self) -> In | None:
        payload = await self._stream.recv()
        if payload is None:
            return None
        try:
            return self._incoming.FromString(payload)
        except DecodeError as exc:
            name = self._incoming.DESCRIPTOR.full_name
            raise InvalidArgument(f"a message that is not a {name}: {exc}") from None

    async def recv(self) -> In | None:
        """The client's next message (its ack and data already counted); None once it
        has closed its side."""
        return await self._pump.recv()

    def send_data_from_pipe(self, tag: bytes, pipe: int, size: int) -> None:
        """As send_data, the data being `size` bytes waiting in `pipe`: they go from
        the pipe to the socket without passing through Python (splice(2))."""
        self._stream.send_from_pipe(data_head(tag, size), pipe, size)

    async def first(self, what: str) -> In:
        """The opening message, which must have `what` set."""
        message = await self.recv()
        if message is None or not message.HasField(what):
            raise InvalidArgument(f"the first message must have {what!r} set")
        return message

    async def close(self) -> None:
        await self._pump.close()
