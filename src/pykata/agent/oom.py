"""Out-of-memory events of containers, as GetOOMEvent reports them.

cgroup v1: an eventfd registered through cgroup.event_control for the
container's memory.oom_control. The kernel signals it when an OOM starts
(before the oom_kill counter moves, so the counter cannot tell), and once
more when the cgroup goes away - told apart by the cgroup being gone.
cgroup v2: the oom_kill counter of memory.events, polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from . import cgroups
from .errors import FailedPrecondition
from .fdwait import until_ready

log = logging.getLogger("pykata.agent.oom")

V2_POLL_SECONDS = 0.5


def _oom_kills(path: Path) -> int:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _close_all(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


#: OOM events kept for GetOOMEvent; beyond, the oldest is dropped (and logged).
MAX_PENDING_EVENTS = 1024


class OomEvents:
    """Watches containers' memory cgroups; `next()` waits for the next OOM of any.

    `close()` (the sandbox destroyed) answers every waiter with an error, as
    upstream's agent does when it drops its event channel; later waiters wait
    for the next sandbox's events.
    """

    def __init__(self) -> None:
        self._events: asyncio.Queue[str | None] = asyncio.Queue()
        self._waiting = 0
        self._watches: dict[str, asyncio.Task[None]] = {}

    async def next(self) -> str:
        events = self._events
        self._waiting += 1
        try:
            container_id = await events.get()
        finally:
            self._waiting -= 1
        if container_id is None:
            raise FailedPrecondition("no more OOM events: the sandbox was destroyed")
        return container_id

    def close(self) -> None:
        for task in self._watches.values():
            task.cancel()
        self._watches.clear()
        ended, self._events = self._events, asyncio.Queue()
        for _ in range(self._waiting):
            ended.put_nowait(None)

    def _event(self, container_id: str) -> None:
        if self._events.qsize() >= MAX_PENDING_EVENTS:
            dropped = self._events.get_nowait()
            log.warning("OOM event of container %s dropped: nobody asks for them", dropped)
        self._events.put_nowait(container_id)

    def watch(self, container_id: str, cgroup: str) -> None:
        if container_id in self._watches:
            return
        watcher = self._watch_v2 if cgroups.is_v2() else self._watch_v1
        self._watches[container_id] = asyncio.ensure_future(watcher(container_id, cgroup))

    def forget(self, container_id: str) -> None:
        task = self._watches.pop(container_id, None)
        if task is not None:
            task.cancel()

    async def _watch_v1(self, container_id: str, cgroup: str) -> None:
        memory = cgroups.ROOT / "memory" / cgroup.lstrip("/")
        control = memory / "memory.oom_control"
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            cfd = os.open(control, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            os.close(efd)
            log.warning("no OOM events for container %s: %s", container_id, exc)
            return
        loop = asyncio.get_running_loop()
        try:
            (memory / "cgroup.event_control").write_text(f"{efd} {cfd}")
            while True:
                await until_ready(efd)
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(efd)
                if not memory.exists():
                    return
                self._event(container_id)
        except OSError as exc:
            log.warning("OOM watch of container %s ended: %s", container_id, exc)
        finally:
            # Closing unregisters the cgroup event: ~0.5 ms each, so off the event loop.
            loop.run_in_executor(None, _close_all, efd, cfd)

    async def _watch_v2(self, container_id: str, cgroup: str) -> None:
        events = cgroups.ROOT / cgroup.lstrip("/") / "memory.events"
        seen = _oom_kills(events)
        while events.exists():
            await asyncio.sleep(V2_POLL_SECONDS)
            kills = _oom_kills(events)
            if kills > seen:
                seen = kills
                self._event(container_id)
