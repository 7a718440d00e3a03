"""Keep the event loop polling, not sleeping, for a moment after an answer.

A client that calls again as soon as it has its answer (a runtime's
sequence of calls, a benchmark) finds a sleeping server otherwise: the
loop parks in epoll_wait after each answer and the next request must wake
it, which on a virtual machine costs tens of microseconds, more than the
call itself. Go's runtime spins briefly before parking its netpoller, and
Linux busy-polls sockets, for this reason.

While the window is open a callback re-schedules itself, so the loop polls
with a zero timeout and takes the next request the moment it comes. The
window is bounded and adaptive: it opens only after an answer, and only if
the last time the peer's next request came within a window (a client
that thinks longer than that gets no spinning). An idle server never
spins: with no answers there is no window.
"""

from __future__ import annotations

import asyncio
import time

#: The clock: uvloop's loop.time() counts whole milliseconds, far coarser than a window.
_now = time.monotonic


class BusyPoll:
    def __init__(self, loop: asyncio.AbstractEventLoop, window: float) -> None:
        self._loop = loop
        #: Seconds the loop keeps polling after an answer; 0: never.
        self.window = window
        self._deadline = 0.0
        self._answered_at: float | None = None
        #: Whether the last wait for a request after an answer was short
        #: enough that polling would have caught it (optimistic at first).
        self._worth_it = True
        self._spinning: asyncio.Handle | None = None
        #: Windows opened so far (for tests and stats).
        self.windows = 0

    @property
    def spinning(self) -> bool:
        return self._spinning is not None

    def received(self) -> None:
        """Input came: learn whether polling after the last answer paid off."""
        if self._answered_at is not None:
            self._worth_it = _now() - self._answered_at <= self.window
            self._answered_at = None

    def answered(self) -> None:
        """An answer went out: poll for the next request for a while, if it pays."""
        if not self.window:
            return
        now = _now()
        self._answered_at = now
        if not self._worth_it:
            return
        self._deadline = now + self.window
        if self._spinning is None:
            self.windows += 1
            self._spinning = self._loop.call_soon(self._spin)

    def _spin(self) -> None:
        if _now() < self._deadline:
            self._spinning = self._loop.call_soon(self._spin)
        else:
            self._spinning = None

    def close(self) -> None:
        if self._spinning is not None:
            self._spinning.cancel()
            self._spinning = None
