"""Exit statuses of container processes, reaped through pidfds.

The agent is the child subreaper: when the runtime exits, the container's
init and detached exec processes become the agent's children. Each known
pid gets a pidfd; the event loop watches it and waitid(P_PIDFD) reaps that
process alone - a blanket waitpid(-1) would steal the exit statuses of the
agent's own runtime invocations. A process that exits before anyone asks
stays a zombie until reaped, so no status is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
from collections.abc import Iterator

from .fdwait import until_ready

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper(on: bool = True) -> None:
    """Make this process the child subreaper (or, with on=False, stop being one)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def exit_status(info: os.waitid_result) -> int:
    """The shell's convention, as upstream reports it: code, or 128 + signal."""
    if info.si_code == os.CLD_EXITED:
        return info.si_status
    return 128 + info.si_status


async def process_exit(pid: int) -> None:
    """Until the child `pid` has exited (it is left for the caller to reap)."""
    fd = os.pidfd_open(pid)
    try:
        await until_ready(fd)
    finally:
        os.close(fd)


class WatchedProcess:
    """A child process known by pidfd: signal it safely, await its exit status."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd: int | None = os.pidfd_open(pid)
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = self._loop.create_future()
        self._loop.add_reader(self._fd, self._reap)
        orphans.watched.add(pid)

    def _reap(self) -> None:
        assert self._fd is not None
        try:
            info = os.waitid(os.P_PIDFD, self._fd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            # Not (or no longer) our child: nothing to reap, only its end to note.
            info = None
            status = -1
        else:
            if info is None:
                return  # woken, but not exited yet
            status = exit_status(info)
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = None
        orphans.watched.discard(self.pid)
        if not self.exited.done():
            self.exited.set_result(status)

    def send_signal(self, signum: int) -> None:
        """Signal this exact process (no pid-reuse race); a no-op once it has exited."""
        if self._fd is None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._fd, signum)

    def close(self) -> None:
        """Stop watching (the agent no longer cares); an unreaped zombie goes to the sweeper."""
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
        orphans.watched.discard(self.pid)


class Orphans:
    """Reaps zombies nobody else will: orphans reparented to us, the subreaper.

    A runtime's helper process that outlives its parent (a failed `exec`, for
    one) lands here as a zombie. Unreaped, it can even keep a container's
    PID-namespace init from finishing its exit. Reaping it is only safe when
    no runtime invocation is running (one could be ours for asyncio to
    collect, or an exec whose pid file is not read yet) and the pid is not
    one we watch or keep.
    """

    def __init__(self) -> None:
        self.watched: set[int] = set()
        self.kept: set[int] = set()
        self._busy = 0

    @contextlib.contextmanager
    def runtime_running(self) -> Iterator[None]:
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            self.sweep()

    def sweep(self) -> list[int]:
        if self._busy or not _zombie_child():
            return []
        reaped = []
        for pid in _children():
            if pid in self.watched or pid in self.kept or not _is_zombie(pid):
                continue
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
                reaped.append(pid)
        return reaped


def _zombie_child() -> bool:
    """Whether any child has exited and waits to be reaped (one syscall; reaps nothing).

    Most sweeps find none: then the walk through /proc is not needed."""
    try:
        return os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return False  # no children at all


def _children() -> set[int]:
    pids: set[int] = set()
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
    return pids


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


orphans = Orphans()
