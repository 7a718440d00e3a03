"""kata-agent-ctl console: the agent's debug console, interactive or one command.

Interactive: the terminal goes raw and every byte goes both ways until the
shell exits (type `exit`) or the agent goes away. If the agent announces
that it can (pykata's does), the console's terminal gets our window's size,
and every resize: as the escape sequence xterm uses for a resize request
(CSI 8 ; rows ; cols t), which the agent applies to the console's terminal
instead of passing it to the shell.

One command (`-c`), or a script on stdin (a pipe or a file): for scripts
and CI. It runs in the console's shell between two marker lines, with
/dev/null as its input; only what it prints (stdout and stderr, merged by
the terminal) is printed, and its exit status becomes ours.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from typing import BinaryIO

from . import terminal

#: Upstream's default debug console port.
DEFAULT_PORT = 1026
#: What pykata's agent sends first: it applies resize requests (agent/console.py).
RESIZE_ANNOUNCE = b"\x1b]7041;pykata-console;resize\x07"
#: The largest script read from stdin.
MAX_SCRIPT = 1 << 20


def resize_request(rows: int, cols: int) -> bytes:
    """xterm's "resize the text area" sequence; the agent's console applies it."""
    return f"\x1b[8;{rows};{cols}t".encode()


def read_script(stream: BinaryIO) -> str:
    """A script piped in, at most MAX_SCRIPT bytes."""
    data = stream.read(MAX_SCRIPT + 1)
    if len(data) > MAX_SCRIPT:
        raise ValueError(f"the script on stdin is larger than {MAX_SCRIPT >> 20} MiB")
    return data.decode(errors="surrogateescape")


def run_command(sock: socket.socket, command: str, timeout: float | None) -> tuple[bytes, int]:
    """Run `command` in the console's shell: (its output, its exit status)."""
    marker = f"pykata-{uuid.uuid4().hex[:12]}"
    if not command.strip():
        command = ":"  # an empty subshell is a syntax error
    # One compound command, read whole before it runs: no prompt lands in the
    # output. A subshell, so that `exit N` in it is just its status. The end
    # marker starts on a line of its own even after output without a newline.
    # The shell is not told to exit: leaving ends it, and over a serial port a
    # shell still exiting would swallow the next client's command.
    # Its input is /dev/null: what it reads must not wait for keys nobody types. The
    # terminal gets the size of ours, if we print to one (stty: any agent's shell).
    window = terminal.first_size(1, 2)
    size = f" rows {window[0]} cols {window[1]}" if window else ""
    script = (
        f"stty -echo{size} 2>/dev/null; echo {marker}-BEGIN; ( {command}\n) </dev/null; "
        f"printf '\\n{marker}-END:%d\\n' $?\n"
    )
    sock.sendall(script.encode(errors="surrogateescape"))
    received = bytearray()
    deadline = None if timeout is None else time.monotonic() + timeout
    # The echoed script shows "%d", never digits: only the real end line matches.
    finished = re.compile(rf"{marker}-END:\d+\r?\n".encode())
    # Until the end line - or the connection's end (a serial port never closes).
    while not finished.search(received):
        if deadline is not None:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise TimeoutError(f"command did not finish within {timeout:g}s") from None
        if not chunk:
            break
        received += chunk
    return parse_output(bytes(received), marker)


_CSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def _plain(line: bytes) -> bytes:
    """A terminal line as it looks: escape sequences gone, only what follows the last CR."""
    return _CSI.sub(b"", line).rsplit(b"\r", 1)[-1]


def parse_output(received: bytes, marker: str) -> tuple[bytes, int]:
    """The command's output and status from all the console sent (see run_command)."""
    lines = received.replace(b"\r\n", b"\n").split(b"\n")
    plain = [_plain(line) for line in lines]
    begin, end = f"{marker}-BEGIN".encode(), f"{marker}-END:".encode()
    try:
        first = plain.index(begin) + 1
    except ValueError:
        raise ConnectionError("the console closed before the command started") from None
    for n in range(first, len(lines)):
        if plain[n].startswith(end):
            return b"\n".join(lines[first:n]), int(plain[n][len(end) :])
    raise ConnectionError("the console closed before the command finished")


def interactive(sock: socket.socket) -> None:
    """Bridge our terminal (or pipes) and the console until either side ends."""
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(stdin, selectors.EVENT_READ)
    first = Announcement()
    with _window_changes(selector) as changed, terminal.raw(stdin):
        while True:
            for key, _ in selector.select():
                if key.fileobj is sock:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if not first.settled:
                        data = first.feed(data)
                        if first.resizes:
                            _send_size(sock)
                    os.write(stdout, data)
                elif key.fd == stdin:
                    data = os.read(stdin, 65536)
                    if not data:  # end of our input: let the shell finish
                        selector.unregister(stdin)
                        sock.shutdown(socket.SHUT_WR)
                        continue
                    sock.sendall(data)
                elif key.fd == changed:  # SIGWINCH woke us: our window changed
                    with contextlib.suppress(OSError):
                        os.read(key.fd, 64)
                    if first.resizes:
                        _send_size(sock)


class Announcement:
    """Whether the agent's first bytes say it applies resize requests (and those bytes
    taken out of what is shown)."""

    def __init__(self) -> None:
        self.settled = False
        self.resizes = False
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        """What to show of `data`; sets `settled` (and `resizes`) once it is known."""
        data, self._held = self._held + data, b""
        if data.startswith(RESIZE_ANNOUNCE):
            self.settled = self.resizes = True
            return data[len(RESIZE_ANNOUNCE) :]
        if RESIZE_ANNOUNCE.startswith(data):  # cut short: wait for the rest
            self._held = data
            return b""
        self.settled = True
        return data


def _send_size(sock: socket.socket) -> None:
    window = terminal.first_size(sys.stdin.fileno(), sys.stdout.fileno())
    if window is not None:
        sock.sendall(resize_request(*window))


@contextlib.contextmanager
def _window_changes(selector: selectors.BaseSelector) -> Iterator[int]:
    """A file descriptor the selector sees readable at every SIGWINCH (a wake-up pipe)."""
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    os.set_blocking(wake_read, False)
    selector.register(wake_read, selectors.EVENT_READ)
    previous_fd = signal.set_wakeup_fd(wake_write)
    previous = signal.signal(signal.SIGWINCH, lambda _n, _f: None)  # a handler, so it wakes us
    try:
        yield wake_read
    finally:
        signal.signal(signal.SIGWINCH, previous)
        signal.set_wakeup_fd(previous_fd)
        selector.unregister(wake_read)
        os.close(wake_read)
        os.close(wake_write)
