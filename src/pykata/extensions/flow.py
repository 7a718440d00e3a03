"""Flow control for the extensions' streams, the same on both ends.

ttRPC streams have none of their own: a sender could fill its peer's memory.
So each side may have at most a window of data in flight that the other has
not acknowledged; the receiver acknowledges what it has consumed (not what
it has merely received), in steps of a quarter window, so the sender never
stops while the receiver keeps up. A sender that must wait has more than
three quarters of the window in flight (no message is larger than a
quarter), so once the receiver has consumed it, an acknowledgement is due:
the two never wait for each other. Data that trickles (a terminal) is
acknowledged rarely, and need not be: it never fills the window. A peer
that sends past the window breaks the protocol: `WindowExceeded`.

A sender may hold room for a message before it has the message (Exec's
output, held once the pipe has output and before it is taken, so the output
can go on the moment it is taken): held room is in flight for the window, but
the peer cannot acknowledge it, as it was not sent. Room is held for at most
one message per stream, and only by a stream with something to send, so a
waiting sender still has more than half the window sent: an ack is due.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from google.protobuf.message import Message

from .wire import data_head


class WindowExceeded(Exception):
    """The peer broke flow control (one of the two below)."""


class WindowOverrun(WindowExceeded):
    """The peer sent more than the window allows."""


class AckBeyondSent(WindowExceeded):
    """The peer acknowledged more than it was sent."""


class SendWindow:
    """What this side may still send before the peer acknowledges some."""

    def __init__(self, size: int) -> None:
        self.size = size
        #: Sent and not acknowledged, and held for a send to come (`held`).
        self.in_flight = 0
        #: Room taken by hold() for bytes not sent yet: the peer cannot acknowledge them.
        self.held = 0
        self._changed = asyncio.Event()
        self._closed: BaseException | None = None

    async def reserve(self, amount: int) -> None:
        """Wait until `amount` more fits (one message always fits an empty window)."""
        while self.in_flight and self.in_flight + amount > self.size:
            if self._closed is not None:
                raise self._closed
            self._changed.clear()
            await self._changed.wait()
        if self._closed is not None:
            raise self._closed
        self.in_flight += amount

    async def hold(self, amount: int) -> None:
        """As reserve(), for up to `amount` bytes sent later; then sent() says how many."""
        await self.reserve(amount)
        self.held += amount

    def sent(self, held: int, amount: int) -> None:
        """Of `held` bytes held, `amount` were sent; the rest of the room is given back."""
        self.held -= held
        self.in_flight -= held - amount
        self._changed.set()

    def acknowledged(self, amount: int) -> None:
        sent = self.in_flight - self.held
        if amount > sent:
            raise AckBeyondSent(
                f"the peer acknowledged {amount} bytes, but only {sent} are in flight"
            )
        self.in_flight -= amount
        self._changed.set()

    def close(self, reason: BaseException) -> None:
        """Wake a waiting reserve(), which raises `reason`."""
        self._closed = reason
        self._changed.set()


class ReceiveWindow:
    """What the peer has sent that this side has not acknowledged yet."""

    def __init__(self, size: int, unit: str = "bytes") -> None:
        self.size = size
        self.unit = unit
        #: Received and not acknowledged.
        self.outstanding = 0
        #: Consumed and not acknowledged.
        self._consumed = 0

    def received(self, amount: int) -> None:
        self.outstanding += amount
        if self.outstanding > self.size:
            raise WindowOverrun(
                f"the peer has {self.outstanding} {self.unit} in flight, more than "
                f"the window of {self.size}"
            )

    def consumed(self, amount: int) -> int:
        """Note `amount` consumed; what to acknowledge now (0: not yet)."""
        self._consumed += amount
        if self._consumed < max(1, self.size // 4):
            return 0
        ack, self._consumed = self._consumed, 0
        self.outstanding -= ack
        return ack


class RawStream(Protocol):
    """A ttRPC stream's sending side (server or client end)."""

    def send(self, payload: bytes) -> None: ...

    def send_parts(self, head: bytes, data: bytes) -> None: ...


class Sending:
    """What both ends' channels do the same: send messages and data, and acknowledge
    what they have consumed. A channel sets `raw` and `receive_window`."""

    raw: RawStream
    receive_window: ReceiveWindow

    def send(self, message: Message) -> None:
        self.raw.send(message.SerializeToString())

    def send_data(self, tag: bytes, data: bytes) -> None:
        """A message holding only the bytes field `tag` (wire.data_tag) = `data`,
        encoded by hand: the data is not copied on its way to the socket."""
        self.raw.send_parts(data_head(tag, len(data)), data)

    def consumed(self, amount: int, acknowledgement: Callable[[int], Message]) -> None:
        """Note `amount` data bytes consumed (written on); when an ack is due, send
        `acknowledgement(bytes)`."""
        ack = self.receive_window.consumed(amount)
        if ack:
            self.send(acknowledgement(ack))
