"""One streaming call of pykata.Extensions as the agent sees it: typed messages
both ways, and the flow-control windows (extensions.flow) kept for it."""

from __future__ import annotations

from typing import Generic, TypeVar

from google.protobuf.message import DecodeError, Message

from ..extensions.flow import ReceiveWindow, SendWindow, WindowExceeded
from ..ttrpc import ServerStream
from .errors import InvalidArgument, LimitExceeded

In = TypeVar("In", bound=Message)


class Channel(Generic[In]):
    def __init__(self, stream: ServerStream, incoming: type[In], window: int) -> None:
        self._stream = stream
        self._incoming = incoming
        #: What we may send before the client acknowledges.
        self.send_window = SendWindow(window)
        #: What the client may send before we acknowledge.
        self.receive_window = ReceiveWindow(window)

    async def recv(self) -> In | None:
        """The client's next message; None once it has closed its side."""
        payload = await self._stream.recv()
        if payload is None:
            return None
        try:
            return self._incoming.FromString(payload)
        except DecodeError as exc:
            name = self._incoming.DESCRIPTOR.full_name
            raise InvalidArgument(f"a message that is not a {name}: {exc}") from None

    async def first(self, what: str) -> In:
        """The opening message, which must have `what` set."""
        message = await self.recv()
        if message is None or not message.HasField(what):
            raise InvalidArgument(f"the first message must have {what!r} set")
        return message

    def send(self, message: Message) -> None:
        self._stream.send(message.SerializeToString())

    def received_data(self, amount: int) -> None:
        """The client sent `amount` data bytes: within its window, or the call fails."""
        try:
            self.receive_window.received(amount)
        except WindowExceeded as exc:
            raise LimitExceeded(f"flow control: {exc}") from None

    def acknowledged(self, amount: int) -> None:
        try:
            self.send_window.acknowledged(amount)
        except WindowExceeded as exc:
            raise InvalidArgument(f"flow control: {exc}") from None
