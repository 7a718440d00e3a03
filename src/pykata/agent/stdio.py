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
import os
import socket
import struct
import tempfile
import termios
from pathlib import Path

from .fdwait import until_ready

F_SETPIPE_SZ = 1031


class FdReader:
    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd: int | None = fd
        self._lock = asyncio.Lock()

    async def read(self, size: int) -> bytes:
        async with self._lock:
            while self.fd is not None:
                try:
                    return self._read_available(size)
                except BlockingIOError:
                    await until_ready(self.fd, still_ours=lambda: self.fd is not None)
                except OSError as exc:
                    if exc.errno == errno.EIO:  # pty: the other side is gone
                        return b""
                    raise
            return b""

    def _read_available(self, size: int) -> bytes:
        """Up to `size` bytes: blocks (raises BlockingIOError) only if none are there.

        Takes what the writer has refilled meanwhile too, so a fast producer
        is drained in fewer, larger answers.
        """
        assert self.fd is not None
        chunks = [os.read(self.fd, size)]
        total = len(chunks[0])
        while chunks[-1] and total < size:
            try:
                chunk = os.read(self.fd, size - total)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class FdWriter:
    def __init__(self, fd: int, *, owned: bool = True) -> None:
        os.set_blocking(fd, False)
        self.fd: int | None = fd
        self._owned = owned

    async def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self.fd is None:
                raise BrokenPipeError("stdin is closed")
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                await until_ready(self.fd, write=True, still_ours=lambda: self.fd is not None)
        return len(data)

    def close(self) -> None:
        if self.fd is not None and self._owned:
            os.close(self.fd)
        self.fd = None


class PipeStdio:
    """Three pipes; the child ends go to the runtime, which hands them on."""

    terminal = False

    def __init__(self, pipe_size: int = 0) -> None:
        self._child: list[int] = []
        stdin_r, stdin_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        for fd in (out_w, err_w):
            if pipe_size:
                fcntl.fcntl(fd, F_SETPIPE_SZ, pipe_size)
        self._child = [stdin_r, out_w, err_w]
        self.stdin: FdWriter | None = FdWriter(stdin_w)
        self.stdout = FdReader(out_r)
        self.stderr: FdReader | None = FdReader(err_r)

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
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                stream.close()


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
        self.stdin: FdWriter | None = FdWriter(master, owned=False)
        self.stdout = FdReader(os.dup(master))
        self.stderr: FdReader | None = None

    def resize(self, rows: int, columns: int) -> None:
        fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def size(self) -> tuple[int, int]:
        data = array.array("H", [0, 0, 0, 0])
        fcntl.ioctl(self._master, termios.TIOCGWINSZ, data)
        return data[0], data[1]

    def close(self) -> None:
        if self.stdin is not None:
            self.stdin.close()
        self.stdout.close()
        with contextlib.suppress(OSError):
            os.close(self._master)
