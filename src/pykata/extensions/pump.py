"""Taking a stream's messages as they arrive, on either end.

Acknowledgements must never wait behind data: a side blocked consuming data
(a process not reading its stdin, a socket not drained) may be waiting for
the very acknowledgement that would let the other direction move, and the
two would wait for each other for ever. So a task takes every message as
it arrives, applies its ack to the send window at once, counts its data
against the receive window (a peer past it fails the call now, not when its
data is finally taken), and queues it for the consumer - a queue bounded by
that window.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from .flow import ReceiveWindow, SendWindow

#: What the stream hands out: messages (or, on the client, hand-decoded pieces).
Item = TypeVar("Item")


class Pump(Generic[Item]):
    def __init__(
        self,
        receive: Callable[[], Awaitable[Item | None]],
        send_window: SendWindow,
        receive_window: ReceiveWindow,
        ack_of: Callable[[Item], int],
        data_of: Callable[[Item], int],
        failure: Callable[[Exception], BaseException],
    ) -> None:
        self._receive = receive
        self._send_window = send_window
        self._receive_window = receive_window
        self._ack_of = ack_of
        self._data_of = data_of
        self._failure = failure
        self._queue: asyncio.Queue[Item | None] = asyncio.Queue()
        self._error: BaseException | None = None
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            while True:
                message = await self._receive()
                if message is None:
                    break
                ack = self._ack_of(message)
                if ack:
                    self._send_window.acknowledged(ack)
                size = self._data_of(message)
                if size:
                    self._receive_window.received(size)
                self._queue.put_nowait(message)
        except Exception as exc:
            self._error = self._failure(exc)
            self._send_window.close(self._error)
        self._queue.put_nowait(None)

    async def recv(self) -> Item | None:
        """The next message; None at the end; the peer's breach of protocol, raised."""
        message = await self._queue.get()
        if message is None:
            self._queue.put_nowait(None)  # the end stays the end
            if self._error is not None:
                raise self._error
        return message

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
