"""Waiting on a file descriptor in the event loop (pipes, ptys, pidfds, eventfds)."""

from __future__ import annotations

import asyncio
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
