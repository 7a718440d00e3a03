"""Structured logs: one JSON object per line on stderr, as the upstream agent writes.

Every line has msg, level, ts, subsystem, pid, source and name; ids and
other context passed with `extra=` become fields of their own.

Logging must never stall a server, so a daemon can hand the writing to a
thread (`LineWriter.start`): lines then wait in a bounded queue, and when
the output is slower than the logging (a guest's serial console) lines are
dropped and counted instead of blocking - the writer says how many once it
catches up. Every other way Python prints an error (uncaught exceptions in
any thread, asyncio's exception handler, unraisable exceptions, warnings,
other libraries' log records) goes through the same JSON lines
(`install_hooks`, `loop_exception_handler`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import json
import logging
import os
import select
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from types import TracebackType
from typing import Any, TextIO

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

#: Level names as the upstream (slog) agent writes them.
_LEVEL_NAMES = {
    logging.CRITICAL: "CRIT",
    logging.ERROR: "ERRO",
    logging.WARNING: "WARN",
    logging.INFO: "INFO",
    logging.DEBUG: "DEBG",
    TRACE: "TRCE",
}

#: Level names a user may give (-l/--log-level), as upstream's tools accept them.
LEVELS = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
}

#: Bytes of log lines that may wait for a slow output before lines are dropped.
DEFAULT_QUEUE_BYTES = 1 << 20
#: How long exiting waits for queued lines to reach a stuck output.
FLUSH_TIMEOUT = 2.0

_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "subsystem",
}

log = logging.getLogger("pykata.log")


class JsonFormatter(logging.Formatter):
    def __init__(self, name: str, source: str) -> None:
        super().__init__()
        self._name = name
        self._source = source

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        line: dict[str, Any] = {
            "msg": record.getMessage(),
            "level": _LEVEL_NAMES.get(record.levelno, record.levelname),
            "ts": ts.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "subsystem": getattr(record, "subsystem", None) or _subsystem(record.name),
            "pid": str(os.getpid()),
            "source": self._source,
            "name": self._name,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                line[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            # A traceback is a field of the line (newlines escaped), never lines of its own.
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def _subsystem(logger_name: str) -> str:
    # "pykata.ttrpc.server" -> "ttrpc"; the package root itself is "root";
    # another library's logger is named by its top package ("asyncio", "py" for warnings)
    parts = logger_name.split(".")
    if parts[0] == "pykata":
        return parts[1] if len(parts) > 1 else "root"
    return parts[0] or "root"


class LineWriter(logging.Handler):
    """Writes formatted lines to a stream: in the caller's thread until start(),
    then from a thread of its own, so that logging never blocks the caller.

    Started, lines wait in a queue of at most `queue_bytes`; a line that does
    not fit is dropped and counted, and after the next write the writer adds
    one line saying how many were dropped. Formatting stays in the caller's
    thread (a record's arguments may change once it returns).
    """

    def __init__(
        self, stream: TextIO, formatter: logging.Formatter, queue_bytes: int = DEFAULT_QUEUE_BYTES
    ) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.stream = stream
        self.queue_bytes = queue_bytes
        self._lines: collections.deque[str] = collections.deque()
        self._queued = 0  # characters in _lines
        self._dropped = 0  # lines dropped since the last report
        self._writing = False
        self._stopping = False
        #: Until when (time.monotonic) the thread leaves queued lines waiting: hold().
        self._held_until = 0.0
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        #: Lines dropped since start (a queue that was full, or an output that failed).
        self.dropped_total = 0

    def start(self) -> None:
        """Write from a thread from now on (call after any unshare(): it must be
        the only thread then)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
            self._thread.start()

    def hold(self, seconds: float) -> None:
        """Leave lines queued (still bounded) for `seconds`: their output's work - a
        serial console's interrupts - waits until the busy moment is over. flush()
        and close() end the hold."""
        with self._cond:
            self._held_until = time.monotonic() + seconds

    def _holding(self) -> bool:
        return time.monotonic() < self._held_until

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        if self._thread is None:
            self._write(line)
            return
        with self._cond:
            if self._queued + len(line) > self.queue_bytes:
                self._drop(1)
                return
            self._lines.append(line)
            self._queued += len(line)
            self._cond.notify()

    def handleError(self, record: logging.LogRecord) -> None:
        # logging's default prints a traceback to stderr: count the line as lost instead.
        with self._cond:
            self._drop(1)

    def _drop(self, lines: int) -> None:
        self._dropped += lines
        self.dropped_total += lines

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not self._lines or self._holding()):
                    self._cond.wait(self._held_until - time.monotonic() if self._lines else None)
                if not self._lines and self._stopping:
                    return
                text = "".join(self._lines)
                lines = len(self._lines)
                self._lines.clear()
                self._queued = 0
                dropped, self._dropped = self._dropped, 0
                self._writing = True
            if dropped:
                text += self._dropped_line(dropped)
            if not self._write(text):
                with self._cond:
                    self._drop(lines)
            with self._cond:
                self._writing = False
                self._cond.notify_all()

    def _dropped_line(self, count: int) -> str:
        record = logging.LogRecord(
            log.name, logging.WARNING, __file__, 0, "%d log lines dropped", (count,), None
        )
        record.__dict__.update(dropped=count, reason="the log output was slower than the logging")
        return self.format(record) + "\n"

    def _write(self, text: str) -> bool:
        """Write it all, waiting for a non-blocking output if need be; False if it failed."""
        try:
            fd = self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            try:
                self.stream.write(text)
                self.stream.flush()
                return True
            except (OSError, ValueError):
                return False
        try:
            self.stream.flush()  # anything printed to the same stream goes first
            for piece in _whole_lines(text.encode()):
                data = memoryview(piece)
                while data:
                    try:
                        data = data[os.write(fd, data) :]
                    except BlockingIOError:
                        poller = select.poll()
                        poller.register(fd, select.POLLOUT)
                        poller.poll()
        except (OSError, ValueError):
            return False
        return True

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Wait (up to `timeout` seconds) until every queued line is written."""
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                return
            self._held_until = 0.0
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._lines and not self._writing, timeout)

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(FLUSH_TIMEOUT)
        super().close()


def _whole_lines(data: bytes, size: int = select.PIPE_BUF) -> Iterator[bytes]:
    """`data` in pieces of whole lines of at most `size` bytes (a longer line alone).

    A write of up to PIPE_BUF bytes to a pipe is all or nothing: if the process
    ends while the output is stuck, the pipe holds whole lines only.
    """
    start = 0
    while start < len(data):
        end = data.rfind(b"\n", start, start + size) + 1
        if end <= start:  # one line longer than `size`
            end = data.find(b"\n", start) + 1 or len(data)
        yield data[start:end]
        start = end


class RateLimit:
    """Token buckets by key, sans-IO (the caller gives the time): each key may
    pass `burst` times at once, then `rate` times per second; what does not
    pass is counted. At most `keys` keys are remembered (least recently used
    go first), so the limiter itself is bounded.
    """

    def __init__(self, rate: float, burst: int, keys: int = 1024) -> None:
        self.rate = rate
        self.burst = burst
        self.keys = keys
        # key -> [tokens, time of last refill, suppressed count]
        self._buckets: collections.OrderedDict[object, list[float]] = collections.OrderedDict()

    def allow(self, key: object, now: float) -> int | None:
        """None when this one must be suppressed (and is counted); else how many
        were suppressed for `key` since the last one that passed."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = [float(self.burst), now, 0]
            self._buckets[key] = bucket
            if len(self._buckets) > self.keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] < 1:
            bucket[2] += 1
            return None
        bucket[0] -= 1
        suppressed, bucket[2] = int(bucket[2]), 0
        return suppressed

    def take_suppressed(self, key: object) -> int:
        """The count suppressed for `key` since it last passed, reset to zero."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0
        suppressed, bucket[2] = int(bucket[2]), 0
        return suppressed


def setup(
    level: int,
    *,
    name: str,
    source: str,
    stream: TextIO | None = None,
    queue_bytes: int = DEFAULT_QUEUE_BYTES,
) -> LineWriter:
    """Send every log record as a JSON line to `stream` (stderr): pykata's from
    `level` up, other libraries' from WARNING up. Returns the writer; call its
    start() to take the writing off the caller's thread."""
    handler = LineWriter(stream or sys.stderr, JsonFormatter(name, source), queue_bytes)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, LineWriter)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    ours = logging.getLogger("pykata")
    ours.setLevel(level)
    ours.propagate = True
    return handler


def writer() -> LineWriter | None:
    """The handler setup() installed, if any."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LineWriter):
            return handler
    return None


def flush(timeout: float = FLUSH_TIMEOUT) -> None:
    """Wait for queued lines to be written (before an exit that skips atexit)."""
    handler = writer()
    if handler is not None:
        handler.flush(timeout)


# --- every other way Python reports an error, as JSON lines ----------------------


def _log_exception(
    message: str,
    exc_type: type[BaseException],
    exc: BaseException,
    tb: TracebackType | None,
    **fields: Any,
) -> None:
    """One JSON line with the traceback in its `error` field - never raw text,
    even if logging itself fails here."""
    try:
        log.error("%s: %r", message, exc, exc_info=(exc_type, exc, tb), extra=fields)
    except Exception:
        line = {"msg": f"{message}: {exc!r}", "level": "ERRO", "pid": str(os.getpid())}
        with contextlib.suppress(OSError):
            os.write(2, (json.dumps(line, default=str) + "\n").encode())


def _excepthook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    _log_exception("uncaught exception", exc_type, exc, tb)
    flush()


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    thread = args.thread.name if args.thread is not None else "?"
    _log_exception(
        f"uncaught exception in thread {thread}",
        args.exc_type,
        args.exc_value,
        args.exc_traceback,
        thread_name=thread,
    )


def _unraisablehook(unraisable: Any) -> None:
    exc = unraisable.exc_value
    if exc is None:
        return
    _log_exception(
        unraisable.err_msg or "exception ignored",
        unraisable.exc_type,
        exc,
        unraisable.exc_traceback,
        object=repr(unraisable.object),
    )


def _showwarning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    logging.getLogger("py.warnings").warning(
        "%s", message, extra={"category": category.__name__, "where": f"{filename}:{lineno}"}
    )


def install_hooks() -> None:
    """Uncaught exceptions (any thread), unraisable ones and warnings become JSON lines."""
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
    sys.unraisablehook = _unraisablehook
    warnings.showwarning = _showwarning


def loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """For loop.set_exception_handler: what asyncio would print, as one JSON line."""
    message = context.get("message") or "unhandled exception in the event loop"
    exc = context.get("exception")
    fields = {
        key: repr(value)
        for key, value in context.items()
        if key not in ("message", "exception") and value is not None
    }
    if isinstance(exc, BaseException):
        log.error("%s: %r", message, exc, exc_info=exc, extra=fields)
    else:
        log.error("%s", message, extra=fields)
