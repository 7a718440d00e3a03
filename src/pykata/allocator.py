"""Large buffers kept for reuse instead of returned to the kernel at once.

Streaming a gigabyte in 1 MiB pieces allocates and frees a megabyte a
thousand times. glibc's malloc serves blocks that big with mmap(2) and
gives them back at free, or trims them off the heap top, so each piece
costs the kernel a fresh mapping and ~256 page faults: measured, half the
CPU both ends spent per GiB of Exec output (BENCHMARKS.md). Raising the
mmap threshold to MMAP_THRESHOLD and the trim threshold to KEEP_BYTES makes
malloc reuse the same memory for the next piece: a process keeps at most
KEEP_BYTES of freed memory at its heap top (after a transfer; an idle one
never grew it). Programs call this once at start; other C libraries: a no-op.
"""

from __future__ import annotations

import ctypes

#: Blocks smaller than this come from the heap, not from a mapping of their own
#: (the largest ttRPC frame is 4 MiB).
MMAP_THRESHOLD = 8 << 20
#: Freed memory at the heap top kept for reuse.
KEEP_BYTES = 32 << 20
# malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_large_buffers() -> bool:
    """Tune glibc's malloc as above; False where there is no mallopt (not glibc)."""
    try:
        # The running program's own symbols, libc's among them: no library search
        # (ctypes.util.find_library runs ldconfig: ~40 ms of the agent's start-up).
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES)
    )
