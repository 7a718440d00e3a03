"""A tool on a pseudo-terminal, as a person at a terminal runs it: the terminal is
its controlling terminal (Ctrl-C typed is SIGINT, a resize is SIGWINCH), with a
window size of our choosing."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Sequence
from pathlib import Path


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Terminal:
    def __init__(
        self,
        args: Sequence[str],
        home: Path,
        *,
        rows: int = 24,
        cols: int = 80,
        env: dict[str, str] | None = None,
    ) -> None:
        self.master, slave = pty.openpty()
        _set_size(slave, rows, cols)
        full_env = {
            **os.environ,
            "KATA_AGENT_CTL_HISTORY": str(home / "history"),
            "TERM": "dumb",
            **(env or {}),
        }

        def controlling_terminal() -> None:  # in the child, after setsid
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            list(args),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=full_env,
            start_new_session=True,
            preexec_fn=controlling_terminal,
        )
        os.close(slave)
        self.seen = b""
        #: everything read so far, for the assertions that look at all of it
        self.transcript = b""

    def type(self, text: str | bytes) -> None:
        os.write(self.master, text.encode() if isinstance(text, str) else text)

    def resize(self, rows: int, cols: int) -> None:
        """As a window manager does: the kernel sends SIGWINCH to the foreground group."""
        _set_size(self.master, rows, cols)

    def _read(self, timeout: float) -> int | None:
        """Bytes read within `timeout` (0: none came); None once the tool's side is gone."""
        if not select.select([self.master], [], [], timeout)[0]:
            return 0
        try:
            data = os.read(self.master, 65536)
        except OSError:  # every holder of the other side is gone: the tool exited
            return None
        self.seen += data
        self.transcript += data
        return len(data) or None

    def expect(self, pattern: str | bytes, timeout: float = 30) -> bytes:
        """Everything up to and including the first match; the rest stays for later."""
        wanted = pattern.encode() if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while not (match := re.search(wanted, self.seen)):
            left = deadline - time.monotonic()
            assert left > 0, f"no {wanted!r} in {self.seen[-600:]!r}"
            if self._read(left) is None:
                break
        assert match, f"no {wanted!r} before the tool exited: {self.seen[-600:]!r}"
        found, self.seen = self.seen[: match.end()], self.seen[match.end() :]
        return found

    def quiet_for(self, seconds: float) -> bytes:
        """What the tool writes within `seconds` (nothing, when it waits for us)."""
        before = len(self.transcript)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and self._read(left) is not None:
            pass
        return self.transcript[before:]

    def wait(self, timeout: float = 60) -> int:
        """The tool's exit status, reading what it writes meanwhile."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        code = self.proc.wait(max(0.1, deadline - time.monotonic()))
        while self._read(0.05):
            pass
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self.master)
