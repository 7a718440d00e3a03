"""Waiting on a file descriptor in the event loop (pipes, ptys, pidfds, eventfds)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def until_ready(
    fd: int, *, write: bool = False, still_ours: Callable[[], bool] = lambda: True
) -> None:
    """Until `fd` is readable (or writable).

    The registration is removed afterwards unless `still_ours()` says the fd
    was closed meanwhile (its number may then belong to someone else).
    """
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    if write:
        loop.add_writer(fd, _wake, waiter)
    else:
        loop.add_reader(fd, _wake, waiter)
    try:
        await waiter
    finally:
        if still_ours():
            if write:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)


class OwnedFd:
    """A non-blocking fd whose waiter is woken when it is closed.

    A call waiting for the fd (a ReadStdout on a quiet process, a WriteStdin
    to a full pipe) must be answered when the process's container goes
    away, not left waiting on a number that may soon be someone else's.
    """

    def __init__(self, fd: int, *, owned: bool = True) -> None:
        os.set_blocking(fd, False)
        self.fd: int | None = fd
        self._owned = owned
        self._waiter: asyncio.Future[None] | None = None
        self._waiting_to_write = False

    async def ready(self, *, write: bool = False) -> None:
        """Until the fd is readable (or writable), or closed."""
        assert self.fd is not None and self._waiter is None
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        if write:
            loop.add_writer(self.fd, _wake, waiter)
        else:
            loop.add_reader(self.fd, _wake, waiter)
        self._waiter, self._waiting_to_write = waiter, write
        try:
            await waiter
        finally:
            self._unregister()

    def _unregister(self) -> None:
        if self._waiter is None:
            return
        if self.fd is not None:
            loop = self._waiter.get_loop()
            if self._waiting_to_write:
                loop.remove_writer(self.fd)
            else:
                loop.remove_reader(self.fd)
        _wake(self._waiter)
        self._waiter = None

    def close(self) -> None:
        """Close (or, when not owned, let go of) the fd; a waiter returns at once."""
        self._unregister()
        if self.fd is not None and self._owned:
            os.close(self.fd)
        self.fd = None
