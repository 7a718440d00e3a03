"""kata-agent-ctl console: the agent's debug console, interactive or one command.

Interactive: the terminal goes raw and every byte goes both ways until the
shell exits (type `exit`) or the agent goes away.

One command (`-c`): for scripts and CI. The command runs in the console's
shell between two marker lines; what it prints (stdout and stderr, merged
by the terminal) is printed, and its exit status becomes ours.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import socket
import sys
import termios
import time
import tty
import uuid
from collections.abc import Iterator

#: Upstream's default debug console port.
DEFAULT_PORT = 1026


def run_command(sock: socket.socket, command: str, timeout: float | None) -> tuple[bytes, int]:
    """Run `command` in the console's shell: (its output, its exit status)."""
    marker = f"pykata-{uuid.uuid4().hex[:12]}"
    # One compound command, read whole before it runs: no prompt lands in the
    # output. A subshell, so that `exit N` in it is just its status. The end
    # marker starts on a line of its own even after output without a newline.
    # The shell is not told to exit: leaving ends it, and over a serial port a
    # shell still exiting would swallow the next client's command.
    script = (
        f"stty -echo 2>/dev/null; echo {marker}-BEGIN; ( {command}\n); "
        f"printf '\\n{marker}-END:%d\\n' $?\n"
    )
    sock.sendall(script.encode())
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


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def interactive(sock: socket.socket) -> None:
    """Bridge our terminal (or pipes) and the console until either side ends."""
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(stdin, selectors.EVENT_READ)
    with raw_terminal(stdin):
        while True:
            for key, _ in selector.select():
                if key.fileobj is sock:
                    data = sock.recv(65536)
                    if not data:
                        return
                    os.write(stdout, data)
                else:
                    data = os.read(stdin, 65536)
                    if not data:  # end of our input: let the shell finish
                        selector.unregister(stdin)
                        sock.shutdown(socket.SHUT_WR)
                        continue
                    sock.sendall(data)
