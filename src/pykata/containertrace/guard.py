"""Cleans up after a recorder that died without doing so itself.

    python -m pykata.containertrace.guard SESSION    # stdin: a pipe from the recorder

The recorder writes `pid N` for each helper process it starts (agent,
forwarder) and `clean` when it has cleaned up itself. If its stdin ends
without `clean` - the recorder was killed, or crashed - the guard destroys
the session if it still exists and stops the helpers (held by pidfd, so a
reused pid is never signalled).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys

from .session import sessions

GRACE_SECONDS = 5.0


def main() -> int:
    session = sys.argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # outlive the recorder's Ctrl-C
    helpers: list[int] = []  # pidfds
    for line in sys.stdin:
        word, _, value = line.strip().partition(" ")
        if word == "clean":
            return 0
        if word == "pid":
            with contextlib.suppress(ProcessLookupError):
                helpers.append(os.pidfd_open(int(value)))
    if session in sessions():
        subprocess.run(["lttng", "destroy", session], capture_output=True)
        print(f"kata-container-trace guard: destroyed session {session}", file=sys.stderr)
    for fd in helpers:
        stop(fd)
    return 0


def stop(pidfd: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        if not select.select([pidfd], [], [], GRACE_SECONDS)[0]:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
