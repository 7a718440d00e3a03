"""A container process's standard streams: pipes, or a terminal.

The agent holds one end of each pipe (or the pty master) in non-blocking
mode; reads wait for data, return at most the asked length, and return b""
at the end of the stream.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import functools
import os
import socket
import stat
import struct
import sys
import tempfile
import termios
from dataclasses import dataclass
from pathlib import Path

from .fdwait import OwnedFd

F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032
_SPLICE_FLAGS = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
#: Stdout's pipe size when the configuration leaves it to us (agent.container_pipe_size=0):
#: a writer refills a 64 KiB default pipe 16 times per MiB, each refill a wake-up of
#: the agent. Pages are allocated only as data waits in the pipe (so an unread
#: process pins at most this much kernel memory for its stdout).
DEFAULT_PIPE_SIZE = 1 << 20
PIPE_MAX_SIZE = Path("/proc/sys/fs/pipe-max-size")


#: WriteStdin data a process may have waiting behind the one write in progress:
#: two of the largest writes a ttRPC message can carry.
STDIN_PENDING_LIMIT = 8 << 20


@dataclass(frozen=True)
class InPipe:
    """`size` bytes (at least one) waiting in the pipe `fd`, which only the agent
    reads, left there for the caller to move on (splice(2)) before it next
    awaits anything."""

    fd: int
    size: int


class OutputReader:
    """The agent's end of a process's stdout or stderr (a pipe, or the pty master).

    Reads wait for data and return at most the asked length; b"" means the
    stream has ended (the writer's end closed; for a pty, EIO), and the fd is
    closed at once. After the process exits, `collect_rest` moves what is
    left in the pipe into memory so the fd need not outlive the process.

    next_output() moves a pipe's output into a relay pipe of the agent's own
    (splice(2), no copy) rather than counting it where it is: the process can
    open its own stdout pipe for reading (/proc/self/fd/1) and take bytes
    between a count and the caller's move, and a frame announced with bytes
    that never come would end the whole connection.
    """

    def __init__(self, fd: int) -> None:
        self._fd = OwnedFd(fd)
        self._lock = asyncio.Lock()
        self._kept = bytearray()
        self._pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
        #: (read, write) ends of the relay pipe; made on the first next_output().
        self._relay: tuple[int, int] | None = None
        self.ended = False

    async def read(self, size: int) -> bytes:
        async with self._lock:
            data = await self._read(size, in_pipe=False)
        assert isinstance(data, bytes)
        return data

    async def next_output(self, size: int) -> bytes | InPipe:
        """As read(), except that output from a pipe is not read but returned as
        an InPipe (in the relay pipe), for the caller to move on itself."""
        async with self._lock:
            return await self._read(size, in_pipe=self._pipe)

    async def ready(self) -> None:
        """Until there is output to take, or its end; nothing is taken."""
        async with self._lock:
            fd = self._fd.fd
            if self._kept or fd is None or _waiting(fd):
                return
            if self._relay is not None and _waiting(self._relay[0]):
                return
            await self._fd.ready()

    async def _read(self, size: int, *, in_pipe: bool) -> bytes | InPipe:
        if self._kept:
            data = bytes(self._kept[:size])
            del self._kept[:size]
            return data
        if self._relay is not None and (left := _waiting(self._relay[0])):
            # (Only if its taker failed: bytes relayed come before any still in the pipe.)
            if in_pipe:
                return InPipe(self._relay[0], min(left, size))
            return os.read(self._relay[0], min(left, size))
        while self._fd.fd is not None:
            fd = self._fd.fd
            try:
                if in_pipe:
                    moved = self._relayed(fd, size)
                    if moved:
                        assert self._relay is not None
                        return InPipe(self._relay[0], moved)
                    data = b""
                else:
                    data = self._read_available(fd, size)
            except BlockingIOError:
                await self._fd.ready()
                continue
            if not data:
                self._end()
            return data
        self.ended = True
        return b""

    def _relayed(self, fd: int, size: int) -> int:
        """Move up to `size` bytes waiting in the pipe `fd` into the relay; how many
        (0: the stream has ended; BlockingIOError: none are there yet)."""
        if self._relay is None:
            read, write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            with contextlib.suppress(OSError):  # else smaller moves, nothing lost
                fcntl.fcntl(write, F_SETPIPE_SZ, fcntl.fcntl(fd, F_GETPIPE_SZ))
            self._relay = (read, write)
        return os.splice(fd, self._relay[1], size, flags=_SPLICE_FLAGS)

    def _read_available(self, fd: int, size: int) -> bytes:
        """Up to `size` bytes: blocks (raises BlockingIOError) only if none are there.

        Asks the kernel how much is waiting (FIONREAD) and reads exactly that
        (up to `size`) in one call: os.read(fd, size) would allocate `size`
        bytes up front, and reading in pieces would copy them to join them.
        """
        waiting = _waiting(fd)
        return _read(fd, min(waiting, size) if waiting else size)

    async def collect_rest(self, limit: int) -> None:
        """Keep up to `limit` bytes of what is still in the stream; close it if it ended."""
        async with self._lock:
            if self._relay is not None and (left := _waiting(self._relay[0])):
                self._kept += os.read(self._relay[0], left)
            fd = self._fd.fd
            while fd is not None and len(self._kept) < limit:
                try:
                    chunk = _read(fd, limit - len(self._kept))
                except BlockingIOError:
                    return  # someone else (a child of the process) still holds the stream
                if not chunk:
                    self._close_fds()
                    return
                self._kept += chunk

    def _close_fds(self) -> None:
        self._fd.close()
        if self._relay is not None:
            for fd in self._relay:
                os.close(fd)
            self._relay = None

    def _end(self) -> None:
        self._close_fds()
        self.ended = True

    def close(self) -> None:
        self._kept.clear()
        self._end()


def _read(fd: int, size: int) -> bytes:
    """os.read, with a pty's EIO (its other side is gone) as the end of the stream."""
    try:
        return os.read(fd, size)
    except OSError as exc:
        if exc.errno == errno.EIO:
            return b""
        raise


def _waiting(fd: int) -> int:
    """Bytes waiting in a pipe or terminal (0 if the kernel will not say)."""
    try:
        return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)
    except OSError:
        return 0


def set_pipe_size(fd: int, size: int) -> None:
    """Make the pipe of `fd` hold `size` bytes; 0: DEFAULT_PIPE_SIZE where the kernel
    allows it (pipe-max-size), else the kernel's own default."""
    if size:
        fcntl.fcntl(fd, F_SETPIPE_SZ, size)
        return
    size = _default_pipe_size()
    if size:
        # Refused: the kernel's default size, slower output, nothing lost.
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, F_SETPIPE_SZ, size)


@functools.cache
def _default_pipe_size() -> int:
    try:
        return min(DEFAULT_PIPE_SIZE, int(PIPE_MAX_SIZE.read_text()))
    except (OSError, ValueError):
        return 0


class StdinWriter:
    """The agent's end of a process's stdin: writes in call order, each one whole.

    Callers waiting their turn hold their data, so those bytes are bounded
    (`pending_limit`; the write in progress is not counted). Closing wakes
    every waiting writer, which then fails with BrokenPipeError.
    """

    def __init__(self, fd: int, *, owned: bool = True, pending_limit: int = STDIN_PENDING_LIMIT):
        self._fd = OwnedFd(fd, owned=owned)
        self._turn = asyncio.Lock()
        self._pending = 0
        self.pending_limit = pending_limit

    @property
    def closed(self) -> bool:
        return self._fd.fd is None

    @property
    def pending(self) -> int:
        """Bytes of calls waiting behind the write in progress."""
        return self._pending

    async def write(self, data: bytes) -> int:
        if self.closed:
            raise BrokenPipeError("stdin is closed")
        if self._turn.locked() and self._pending + len(data) > self.pending_limit:
            raise StdinBacklogFull(self._pending, self.pending_limit)
        waiting = self._turn.locked()
        if waiting:
            self._pending += len(data)
        try:
            await self._turn.acquire()
        finally:
            if waiting:
                self._pending -= len(data)
        try:
            view = memoryview(data)
            while view:
                fd = self._fd.fd
                if fd is None:
                    raise BrokenPipeError("stdin is closed")
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    await self._fd.ready(write=True)
            return len(data)
        finally:
            self._turn.release()

    async def close_after_writes(self) -> None:
        """Close once the writes already waiting are done (their bytes all arrive)."""
        async with self._turn:
            self.close()

    def close(self) -> None:
        self._fd.close()


class StdinBacklogFull(Exception):
    def __init__(self, pending: int, limit: int) -> None:
        super().__init__(f"{pending} bytes already wait to be written (limit {limit})")


class PipeStdio:
    """Three pipes; the child ends go to the runtime, which hands them on."""

    terminal = False

    def __init__(self, pipe_size: int = 0) -> None:
        self._child: list[int] = []
        stdin_r, stdin_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        set_pipe_size(out_w, pipe_size)
        # Stderr keeps the kernel's default unless configured: it is rarely bulk,
        # and output nobody reads pins the pipe's memory.
        if pipe_size:
            set_pipe_size(err_w, pipe_size)
        self._child = [stdin_r, out_w, err_w]
        self.stdin = StdinWriter(stdin_w)
        self.stdout = OutputReader(out_r)
        self.stderr: OutputReader | None = OutputReader(err_r)

    @property
    def child_fds(self) -> tuple[int, int, int]:
        return self._child[0], self._child[1], self._child[2]

    def close_child_ends(self) -> None:
        """After the runtime has started the process: only it holds these now."""
        for fd in self._child:
            os.close(fd)
        self._child = []

    def resize(self, rows: int, columns: int) -> None:
        raise OSError(errno.ENOTTY, "not a terminal")

    def close(self) -> None:
        self.close_child_ends()
        self.stdin.close()
        self.stdout.close()
        if self.stderr is not None:
            self.stderr.close()


class ConsoleSocket:
    """Where the runtime sends the pty master (SCM_RIGHTS) for a terminal process."""

    def __init__(self) -> None:
        # A fresh short directory: bundle paths can exceed AF_UNIX's 108 bytes.
        self._dir = Path(tempfile.mkdtemp(prefix="kata-console-"))
        self.path = self._dir / "sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        self._sock.listen(1)
        self._sock.setblocking(False)

    async def receive_master(self, timeout: float = 10.0) -> int:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            conn, _ = await loop.sock_accept(self._sock)
        with conn:
            fds: list[int] = []
            conn.setblocking(True)
            conn.settimeout(timeout)
            _msg, fds, _flags, _addr = await asyncio.to_thread(socket.recv_fds, conn, 4096, 1)
            if not fds:
                raise OSError("the runtime sent no terminal")
            return fds[0]

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            self._dir.rmdir()


class TerminalStdio:
    """A pty master: stdin and stdout are the same file; there is no stderr."""

    terminal = True

    def __init__(self, master: int) -> None:
        self._master = master
        self.stdin = StdinWriter(master, owned=False)
        self.stdout = OutputReader(os.dup(master))
        self.stderr: OutputReader | None = None

    def resize(self, rows: int, columns: int) -> None:
        fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def size(self) -> tuple[int, int]:
        data = array.array("H", [0, 0, 0, 0])
        fcntl.ioctl(self._master, termios.TIOCGWINSZ, data)
        return data[0], data[1]

    def close(self) -> None:
        self.stdin.close()
        self.stdout.close()
        if self._master >= 0:
            os.close(self._master)
            self._master = -1
