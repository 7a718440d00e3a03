"""Watch: changes under a path inside a container, from inotify(7).

The path is resolved inside the container's root (inroot.py) and watched
through the resulting fd (/proc/self/fd/N), so a watch never lands outside;
subdirectories of a recursive watch are opened one at a time with
O_NOFOLLOW. Events wait in a bounded queue while the client is slow (it
acknowledges events as it takes them); past the bound they are dropped and
counted, and the count goes with the next events sent (`lost`), as does an
overflow of the kernel's own queue.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import errno
import os
import struct
from collections.abc import Iterator

from ..api import extensions_pb2 as ext
from ..extensions.flow import SendWindow
from .channel import Channel
from .errors import AgentError, InvalidArgument, LimitExceeded
from .extlimits import WATCH_BATCH
from .inroot import open_in

_libc = ctypes.CDLL(None, use_errno=True)

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)
_EVENT = struct.Struct("iIII")
#: Events sent in one message at most.
BATCH = WATCH_BATCH
Kind = ext.FileEvent.Kind


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


class Watches:
    """Every watch open now, all connections together (bounded)."""

    def __init__(self, limit: int, queue_events: int, window_events: int, max_dirs: int) -> None:
        self.limit = limit
        self.queue_events = queue_events
        self.window_events = window_events
        self.max_dirs = max_dirs
        self.open = 0

    async def run(
        self, channel: Channel[ext.WatchInput], root_fd: int, request: ext.WatchOpen
    ) -> None:
        if self.open >= self.limit:
            raise LimitExceeded(f"too many watches open (limit {self.limit})")
        self.open += 1
        try:
            with _Watch(root_fd, request, self.queue_events, self.max_dirs) as watch:
                watch.add_tree()
                channel.send(ext.WatchOutput(ready=True))
                await watch.serve(channel, SendWindow(self.window_events))
        finally:
            self.open -= 1


class _Watch:
    def __init__(
        self, root_fd: int, request: ext.WatchOpen, queue_events: int, max_dirs: int
    ) -> None:
        #: The container's root, for directories created later (recursive watches).
        self.root = os.dup(root_fd)
        self.base = request.location.path.rstrip("/") or "/"
        self.recursive = request.recursive
        self.queue_limit = queue_events
        self.max_dirs = max_dirs
        self.fd = _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")
        #: watch descriptor -> the watched directory's path inside the container
        self.paths: dict[int, str] = {}
        self.queue: collections.deque[ext.FileEvent] = collections.deque()
        self.lost = 0
        self._arrived = asyncio.Event()
        self._moved_from: tuple[int, str, bool] | None = None

    def __enter__(self) -> _Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
        os.close(self.root)

    # --- what is watched --------------------------------------------------------

    def add_tree(self) -> None:
        fd = open_in(self.root, self.base, os.O_RDONLY | os.O_NONBLOCK)
        try:
            self._add(fd, self.base)
            if self.recursive and os.path.isdir(f"/proc/self/fd/{fd}"):
                self._add_below(fd, self.base)
        finally:
            os.close(fd)

    def _add(self, fd: int, path: str) -> None:
        if len(self.paths) >= self.max_dirs:
            raise LimitExceeded(
                f"watching {path} would watch more than {self.max_dirs} directories"
            )
        wd = _libc.inotify_add_watch(self.fd, f"/proc/self/fd/{fd}".encode(), MASK)
        self.paths[_check(wd, f"watching {path}")] = path

    def _add_below(self, dir_fd: int, path: str) -> None:
        for name in _subdirectories(dir_fd):
            try:
                child = os.open(
                    name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
                )
            except OSError:
                continue  # gone meanwhile, or not a directory any more
            try:
                inside = f"{path.rstrip('/')}/{name}"
                self._add(child, inside)
                self._add_below(child, inside)
            finally:
                os.close(child)

    # --- events -------------------------------------------------------------------

    async def serve(self, channel: Channel[ext.WatchInput], window: SendWindow) -> None:
        """Send what arrives, within the window, until the client closes its side."""
        loop = asyncio.get_running_loop()
        loop.add_reader(self.fd, self._read)
        acks = asyncio.ensure_future(_take_acks(channel, window))
        try:
            while True:
                arrived = asyncio.ensure_future(self._arrived.wait())
                await asyncio.wait([arrived, acks], return_when=asyncio.FIRST_COMPLETED)
                arrived.cancel()
                if acks.done():
                    acks.result()  # its failure, if it failed
                    return
                self._arrived.clear()
                while self.queue or self.lost:
                    batch = [self.queue.popleft() for _ in range(min(BATCH, len(self.queue)))]
                    await window.reserve(max(1, len(batch)))
                    lost, self.lost = self.lost, 0
                    channel.send(ext.WatchOutput(events=batch, lost=lost))
        finally:
            loop.remove_reader(self.fd)
            acks.cancel()
            with contextlib.suppress(BaseException):
                await acks

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 64 << 10)
        except BlockingIOError:
            return
        for event in self._parse(data):
            if len(self.queue) >= self.queue_limit:
                self.lost += 1
            else:
                self.queue.append(event)
        self._flush_moved_from()
        self._arrived.set()

    def _parse(self, data: bytes) -> Iterator[ext.FileEvent]:
        offset = 0
        while offset < len(data):
            wd, mask, cookie, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                self.lost += 1  # the kernel dropped some: at least one
                continue
            if mask & IN_IGNORED:
                self.paths.pop(wd, None)
                continue
            directory = self.paths.get(wd)
            if directory is None:
                continue
            path = f"{directory.rstrip('/')}/{os.fsdecode(name)}" if name else directory
            is_dir = bool(mask & IN_ISDIR)
            yield from self._event(mask, cookie, path, is_dir)

    def _event(self, mask: int, cookie: int, path: str, is_dir: bool) -> Iterator[ext.FileEvent]:
        if mask & IN_MOVED_TO and self._moved_from and self._moved_from[0] == cookie:
            old = self._moved_from[1]
            self._moved_from = None
            yield ext.FileEvent(kind=Kind.RENAME, path=path, old_path=old, is_dir=is_dir)
            return
        yield from self._flush_moved_from_events()
        if mask & IN_MOVED_FROM:
            self._moved_from = (cookie, path, is_dir)  # a rename, if IN_MOVED_TO follows
        elif mask & (IN_CREATE | IN_MOVED_TO):
            yield ext.FileEvent(kind=Kind.CREATE, path=path, is_dir=is_dir)
            if is_dir and self.recursive:
                self._watch_new_directory(path)
        elif mask & (IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF):
            yield ext.FileEvent(kind=Kind.DELETE, path=path, is_dir=is_dir)
        elif mask & IN_MODIFY:
            yield ext.FileEvent(kind=Kind.MODIFY, path=path, is_dir=is_dir)
        elif mask & IN_ATTRIB:
            yield ext.FileEvent(kind=Kind.ATTRIB, path=path, is_dir=is_dir)

    def _flush_moved_from_events(self) -> Iterator[ext.FileEvent]:
        if self._moved_from is not None:
            _cookie, old, is_dir = self._moved_from
            self._moved_from = None
            yield ext.FileEvent(kind=Kind.DELETE, path=old, is_dir=is_dir)  # moved out

    def _flush_moved_from(self) -> None:
        for event in self._flush_moved_from_events():
            if len(self.queue) >= self.queue_limit:
                self.lost += 1
            else:
                self.queue.append(event)

    def _watch_new_directory(self, path: str) -> None:
        """A directory created under a recursive watch, and what it already holds."""
        try:
            fd = open_in(self.root, path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except (AgentError, OSError):
            return  # gone again, or replaced by something that is not a directory
        try:
            self._add(fd, path)
            self._add_below(fd, path)
        except (AgentError, OSError):
            self.lost += 1  # past the directory limit: its events will be missing
        finally:
            os.close(fd)


def _subdirectories(dir_fd: int) -> list[str]:
    try:
        with os.scandir(dir_fd) as entries:
            return [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return []
        raise


async def _take_acks(channel: Channel[ext.WatchInput], window: SendWindow) -> None:
    try:
        while True:
            message = await channel.recv()
            if message is None:
                break
            if message.ack > window.in_flight:
                raise InvalidArgument(
                    f"ack of {message.ack} events, but only {window.in_flight} are unacknowledged"
                )
            if message.ack:
                window.acknowledged(message.ack)
    except Exception as exc:
        window.close(exc)
        raise
    window.close(InvalidArgument("the client closed the stream"))
