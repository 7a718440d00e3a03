"""A one-line progress bar on stderr, redrawn at most ten times a second."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class ProgressBar:
    def __init__(self, label: str, out: TextIO = sys.stderr) -> None:
        self.label = label
        self.out = out
        self.started = time.monotonic()
        self._drawn = 0.0
        self._first: int | None = None

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self._first is None:
            self._first = done  # what a resume started from does not count in the rate
        if done < total and now - self._drawn < 0.1:
            return
        self._drawn = now
        fraction = done / total if total else 1.0
        filled = int(fraction * WIDTH)
        rate = (done - self._first) / max(now - self.started, 1e-6)
        bar = "#" * filled + "-" * (WIDTH - filled)
        self.out.write(
            f"\r{self.label} [{bar}] {fraction:4.0%} {human(done)}/{human(total)} {human(rate)}/s "
        )
        if done >= total:
            self.out.write("\n")
        self.out.flush()
