"""The local terminal: its size, raw mode, and signals turned into loop callbacks."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import struct
import termios
import tty
from collections.abc import Callable, Iterator
from types import FrameType


def size(fd: int) -> tuple[int, int] | None:
    """(rows, columns) of the terminal at `fd`; None if it is not one (or says 0x0)."""
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    except OSError:
        return None
    return (rows, cols) if rows and cols else None


def first_size(*fds: int) -> tuple[int, int] | None:
    """The size of the first of `fds` that is a terminal."""
    return next((s for fd in fds if (s := size(fd)) is not None), None)


@contextlib.contextmanager
def raw(fd: int) -> Iterator[None]:
    """Raw mode while the block runs (nothing if `fd` is not a terminal): every key,
    Ctrl-C included, is a byte for the other side, and output passes untouched."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSADRAIN)  # keys typed ahead are kept, not flushed
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def untouched_output(fd: int) -> Iterator[None]:
    """No output processing (a remote terminal already turned \\n into \\r\\n)."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    changed = list(saved)
    changed[1] &= ~termios.OPOST
    termios.tcsetattr(fd, termios.TCSADRAIN, changed)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def signals_to_loop(
    loop: asyncio.AbstractEventLoop, handlers: dict[int, Callable[[int], None]]
) -> Iterator[None]:
    """Each signal calls its handler on `loop` (from any point, even while the loop
    waits); the previous dispositions come back after the block. A signal our parent
    set to be ignored (a shell's `cmd &`) stays ignored, as shells and C programs do."""

    def deliver(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to do
            loop.call_soon_threadsafe(handlers[signum], signum)

    previous = {
        signum: signal.signal(signum, deliver)
        for signum in handlers
        if signal.getsignal(signum) is not signal.SIG_IGN
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
