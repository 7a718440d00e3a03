"""kata-agent-ctl's entry point: Ctrl-C while it starts ends it quietly."""

from __future__ import annotations

import signal
import sys


def main(argv: list[str] | None = None) -> int:
    # Until the tool is ready to take Ctrl-C over, it ends it as it ends a C program:
    # at once, with no traceback from the middle of an import. Ignored stays ignored.
    interactive_sigint = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if interactive_sigint:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    from .commandline import main as run

    if interactive_sigint:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
