"""Megabyte buffers are reused, not mapped afresh for every piece (pykata.allocator)."""

from __future__ import annotations

import subprocess
import sys

PIECES = """
import resource, sys
from pykata import allocator
if sys.argv[1] == "tuned":
    assert allocator.keep_large_buffers()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):  # what streaming 200 MiB in 1 MiB pieces allocates:
    read = b"x" * (1 << 20)  # the piece read (written, as a read from a pipe writes it)
    frame = read + b"header"  # and what carries it, alive at the same time
    del read, frame
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", PIECES, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


def test_megabyte_pieces_reuse_their_memory_once_tuned() -> None:
    untuned, tuned = page_faults("default"), page_faults("tuned")
    # Untuned, glibc gives the freed megabytes back (trims the heap or unmaps them)
    # and faults them in again for the next piece: ~96,000 faults measured.
    assert untuned > 200 * 256
    # Tuned, the first piece's pages are reused by the rest (~500 measured).
    assert tuned < 200 * 20
