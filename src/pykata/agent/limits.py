"""File descriptors: as many as the agent may have, and never all for connections.

A guest's PID 1 starts with the kernel's default of 1,024 open files (hard
limit 4,096). Every connection costs one, and so do a container's pipes and
pidfds, so connections alone must never be able to use them all: the
agent raises its soft limit to the hard one at start, then lets connections
use only what is left after `reserved_fds`.
"""

from __future__ import annotations

import logging
import os
import resource

log = logging.getLogger("pykata.agent")


def raise_fd_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard one; returns (soft, hard) as they now are."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def connections_that_fit(configured: int, reserved_fds: int) -> int:
    """At most `configured` connections, fewer if the open files limit leaves
    fewer than `reserved_fds` descriptors otherwise (never fewer than one)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = soft - open_fds() - reserved_fds
    fitting = max(1, min(configured, room))
    if fitting < configured:
        log.warning(
            "serving at most %d connections, not %d: the open files limit is %d and "
            "%d descriptors are reserved for containers and processes",
            fitting,
            configured,
            soft,
            reserved_fds,
        )
    return fitting
