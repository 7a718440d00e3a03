"""Child processes that must not outlive the process that started them."""

from __future__ import annotations

import ctypes
import signal
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None]:
    """A preexec_fn: the child gets `signum` when its parent dies, even by SIGKILL.

    (The kernel clears it when the child changes credentials, e.g. drops to nobody.)
    """

    def arm() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)

    return arm
