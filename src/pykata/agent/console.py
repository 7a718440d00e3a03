"""The debug console and the log port: two more listening sockets of the agent.

Debug console (`agent.debug_console`, off by default): every connection
gets its own shell (bash, else sh) on a fresh pseudo-terminal, in its own
session; the bytes of the connection are the terminal's. Closing the
connection hangs the shell up; the shell exiting closes the connection.
A connection starts with RESIZE_ANNOUNCE, an OSC sequence terminals ignore,
saying that a client may send its window size as xterm's resize request
(CSI 8 ; rows ; cols t, which no key sends): the terminal takes that size
and the shell never sees the sequence. (A client must not send it to an
agent that did not announce it: a shell would take it as typed keys.)

Log port (`agent.log_vport`): every connection receives the agent's log
lines from then on, the same JSON lines as on stderr. A reader that falls
more than LOG_BUFFER_LIMIT behind loses lines; it is told how many in a
line of its own when it catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import termios
import threading
from typing import cast

from .. import transport
from .errors import FailedPrecondition
from .reaper import orphans, process_exit

log = logging.getLogger("pykata.agent.console")

SHELLS = ("/bin/bash", "/bin/sh")
LOG_BUFFER_LIMIT = 1 << 20
#: Log port readers at once (each may hold LOG_BUFFER_LIMIT); more are closed at once.
MAX_LOG_READERS = 8
RESIZE_ANNOUNCE = b"\x1b]7041;pykata-console;resize\x07"
_RESIZE = re.compile(rb"\x1b\[8;(\d{1,5});(\d{1,5})t")
#: The start of a resize request cut at the end of what arrived: kept for the rest.
_RESIZE_START = re.compile(rb"\x1b\[8;[\d;]{0,11}$")


def find_shell() -> str | None:
    return next((shell for shell in SHELLS if os.access(shell, os.X_OK)), None)


class _ConsoleSession(asyncio.Protocol):
    """One connection <-> one shell on a pty."""

    def __init__(self, console: DebugConsole) -> None:
        self.console = console
        self.transport: asyncio.Transport | None = None
        self.master = -1
        self.proc: subprocess.Popen[bytes] | None = None
        self._pending = bytearray()  # input the terminal has not taken yet
        self._partial = b""  # a resize request's start, the rest yet to come
        self.waiter: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        listener = self.console.listener
        if listener is not None and not listener.admits(transport):
            log.warning("debug console: refused a peer of another user")
            transport.close()
            return
        self.master, slave = pty.openpty()
        os.set_blocking(self.master, False)
        try:
            # setsid --ctty: a session of its own with the pty as its controlling terminal
            self.proc = subprocess.Popen(
                ["setsid", "--ctty", self.console.shell, "-i"],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                close_fds=True,
                cwd="/",
                env={"TERM": "xterm", "PATH": os.environ.get("PATH", os.defpath), "HOME": "/"},
            )
        finally:
            os.close(slave)
        orphans.kept.add(self.proc.pid)
        self.transport.write(RESIZE_ANNOUNCE)
        log.info("debug console opened", extra={"pid": self.proc.pid})
        loop = asyncio.get_running_loop()
        loop.add_reader(self.master, self._from_terminal)
        self.console.sessions.add(self)
        self.waiter = loop.create_task(self._wait_shell())

    def _from_terminal(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except BlockingIOError:
            return
        except OSError:  # EIO: every holder of the terminal's other side is gone
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.master)
            return
        assert self.transport is not None
        if self.transport.is_closing():
            return  # the client has gone; the shell is being killed (uvloop raises here)
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.master < 0:
            return  # the shell is gone; the connection is closing
        data, self._partial = self._partial + data, b""
        for match in _RESIZE.finditer(data):
            rows, cols = int(match.group(1)), int(match.group(2))
            with contextlib.suppress(OSError, struct.error):
                fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        data = _RESIZE.sub(b"", data)
        if cut := _RESIZE_START.search(data):
            data, self._partial = data[: cut.start()], data[cut.start() :]
        self._pending += data
        self._to_terminal()

    def _to_terminal(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                written = os.write(self.master, self._pending)
                del self._pending[:written]
        except BlockingIOError:
            loop.add_writer(self.master, self._to_terminal)
            return
        except OSError:
            self._pending.clear()
        loop.remove_writer(self.master)

    async def _wait_shell(self) -> None:
        assert self.proc is not None
        await process_exit(self.proc.pid)
        status = self.proc.wait()
        orphans.kept.discard(self.proc.pid)
        # What the shell wrote last is still in the terminal: pass it on.
        assert self.transport is not None
        with contextlib.suppress(OSError):
            while not self.transport.is_closing() and (data := os.read(self.master, 65536)):
                self.transport.write(data)
        log.info("debug console closed", extra={"pid": self.proc.pid, "status": status})
        self._close_terminal()
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool:
        # The client will type no more: end the shell's input as a terminal user
        # does, with Ctrl-D - again every half second, because one typed before the
        # shell has set up its terminal is lost, and a running command may take one
        # first. Meanwhile the shell's output still flows back.
        self._end_of_input()
        return True

    def _end_of_input(self) -> None:
        if self.master < 0 or self.proc is None or self.proc.poll() is not None:
            return
        self.data_received(b"\x04")
        asyncio.get_running_loop().call_later(0.5, self._end_of_input)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # The shell's group once it has its own session; the shell itself even
            # if the connection went before it got that far.
            for kill in (os.killpg, os.kill):
                with contextlib.suppress(ProcessLookupError):
                    kill(self.proc.pid, signal.SIGKILL)
        self.console.sessions.discard(self)

    def _close_terminal(self) -> None:
        if self.master >= 0:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self.master)
            loop.remove_writer(self.master)
            os.close(self.master)
            self.master = -1


class DebugConsole:
    def __init__(self, shell: str) -> None:
        self.shell = shell
        self.listener: transport.Listener | None = None
        self.sessions: set[_ConsoleSession] = set()

    async def start(self, address: str) -> None:
        self.listener = await transport.listen(address, lambda: _ConsoleSession(self))
        log.warning(
            "debug console listening: anyone who can connect gets a root shell",
            extra={"address": address},
        )

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()


class _LogReader(asyncio.Protocol):
    def __init__(self, port: LogPort) -> None:
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.dropped = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        listener = self.port.listener
        if listener is not None and not listener.admits(transport):
            transport.close()
            return
        if len(self.port.readers) >= self.port.max_readers:
            note = f'{{"msg": "log port: {self.port.max_readers} readers already"}}\n'
            cast(asyncio.Transport, transport).write(note.encode())
            transport.close()
            return
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.port.readers.add(self)

    def data_received(self, data: bytes) -> None:
        pass  # the log port only speaks

    def connection_lost(self, exc: Exception | None) -> None:
        self.port.readers.discard(self)

    def send(self, line: bytes) -> None:
        assert self.transport is not None
        if self.transport.get_write_buffer_size() > LOG_BUFFER_LIMIT:
            self.dropped += 1
            return
        if self.dropped:
            note = f'{{"msg": "log port reader too slow: {self.dropped} line(s) dropped"}}\n'
            self.transport.write(note.encode())
            self.dropped = 0
        self.transport.write(line)


class LogPort(logging.Handler):
    """A logging handler that also serves every line to the log port's readers."""

    def __init__(self, formatter: logging.Formatter, max_readers: int = MAX_LOG_READERS) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.max_readers = max_readers
        self.listener: transport.Listener | None = None
        self.readers: set[_LogReader] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0

    async def start(self, address: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.listener = await transport.listen(address, lambda: _LogReader(self))
        logging.getLogger("pykata").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if not self.readers or self._loop is None:
            return
        line = (self.format(record) + "\n").encode()
        if threading.get_ident() == self._loop_thread:
            self._send(line)
        else:  # e.g. the span exporter's thread
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self._loop.call_soon_threadsafe(self._send, line)

    def _send(self, line: bytes) -> None:
        for reader in list(self.readers):
            reader.send(line)

    def close(self) -> None:
        logging.getLogger("pykata").removeHandler(self)
        if self.listener is not None:
            self.listener.close()
        for reader in list(self.readers):
            if reader.transport is not None:
                reader.transport.close()
        super().close()


def shell_or_error() -> str:
    shell = find_shell()
    if shell is None:
        raise FailedPrecondition(f"no shell for the debug console: none of {', '.join(SHELLS)}")
    if shutil.which("setsid") is None:
        raise FailedPrecondition("setsid (util-linux) is needed for the debug console")
    return shell
