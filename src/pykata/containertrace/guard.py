"""Destroys an LTTng session once its recorder is gone, however it went.

    python -m pykata.containertrace.guard SESSION    # stdin: a pipe from the recorder

Blocks until its stdin reaches end of file - the recorder closed it, or
died and the kernel closed it - then destroys the session if it still
exists.
"""

from __future__ import annotations

import signal
import subprocess
import sys

from .session import sessions


def main() -> int:
    session = sys.argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # outlive the recorder's Ctrl-C
    while sys.stdin.buffer.read(4096):
        pass
    if session in sessions():
        subprocess.run(["lttng", "destroy", session], capture_output=True)
        print(f"kata-container-trace guard: destroyed session {session}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
