"""Logging that never blocks, never amplifies without bound and never prints a raw traceback."""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import textwrap
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykata.log import JsonFormatter, LineWriter, RateLimit, _whole_lines


@given(
    st.floats(0.1, 100),
    st.integers(1, 20),
    st.lists(st.tuples(st.integers(0, 3), st.floats(0, 2)), max_size=300),
)
def test_rate_limit_bounds_each_key_and_accounts_for_every_event(
    rate: float, burst: int, events: list[tuple[int, float]]
) -> None:
    limit = RateLimit(rate, burst)
    now = 0.0
    passed: dict[int, list[float]] = {}
    reported = 0
    for key, step in events:
        now += step
        result = limit.allow(key, now)
        if result is not None:
            passed.setdefault(key, []).append(now)
            reported += result
    reported += sum(limit.take_suppressed(key) for key in range(4))
    # Nothing is lost: every event either passed or is in a count.
    assert sum(map(len, passed.values())) + reported == len(events)
    # No key passes more than its burst plus what the rate refilled.
    for times in passed.values():
        for i, start in enumerate(times):
            for j in range(i, len(times)):
                assert j - i + 1 <= burst + (times[j] - start) * rate + 1e-6


def test_rate_limit_remembers_a_bounded_number_of_keys() -> None:
    limit = RateLimit(1, 1, keys=10)
    for key in range(1000):
        limit.allow(key, 0.0)
    assert len(limit._buckets) == 10


@given(st.lists(st.integers(0, 9000), max_size=40), st.integers(16, 4096))
def test_lines_are_written_in_whole_lines_a_pipe_takes_at_once(
    lengths: list[int], size: int
) -> None:
    """Pieces of at most PIPE_BUF bytes are written to a pipe all or nothing: if
    the agent ends while its console is stuck, no half line is left behind."""
    data = b"".join(b"x" * n + b"\n" for n in lengths)
    pieces = list(_whole_lines(data, size))
    assert b"".join(pieces) == data
    for piece in pieces:
        assert piece.endswith(b"\n")
        assert len(piece) <= size or piece.count(b"\n") == 1


def test_a_stuck_output_never_blocks_logging_and_drops_are_counted() -> None:
    """A pipe nobody reads (a serial console that stopped): logging goes on at
    full speed; lines that do not fit the queue are dropped and counted, and
    once the output moves again the count is written - no line vanishes unsaid."""
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    writer = LineWriter(stream, JsonFormatter("t", "test"), queue_bytes=64 << 10)
    writer.start()
    logger = logging.getLogger("pykata.test.stuck")
    logger.propagate = False
    logger.addHandler(writer)
    lines = 20_000
    try:
        done = threading.Event()

        def log_them() -> None:
            for n in range(lines):
                logger.warning("line %d of a flood that the output cannot keep up with", n)
            done.set()

        threading.Thread(target=log_them, daemon=True).start()
        # Nobody reads the pipe meanwhile. A blocking logger would stop at the
        # pipe's 64 KiB; this one goes on to the end (the wait only catches a hang).
        assert done.wait(60), "logging blocked on a stuck output"
        assert writer.dropped_total > 0

        received = bytearray()
        reader = threading.Thread(target=lambda: _read_all(read_end, received), daemon=True)
        reader.start()
        writer.close()
        stream.close()
        reader.join(30)
    finally:
        logger.removeHandler(writer)
    records = [json.loads(line) for line in received.decode().splitlines()]
    written = [r for r in records if r["msg"].startswith("line ")]
    dropped = [r for r in records if r["msg"].endswith("log lines dropped")]
    assert dropped and all(r["level"] == "WARN" for r in dropped)
    assert len(written) + sum(r["dropped"] for r in dropped) == lines
    assert writer.dropped_total == sum(r["dropped"] for r in dropped)


def test_held_lines_wait_then_all_come_in_order() -> None:
    """A restored guest holds its log output for a moment (agent/restore.py): lines
    logged meanwhile wait in the queue, none lost, and come once the hold ends - by
    flush() (as before a power-off) or by itself."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    stream = os.fdopen(write_end, "w")
    writer = LineWriter(stream, JsonFormatter("t", "test"))
    writer.start()
    logger = logging.getLogger("pykata.test.held")
    logger.propagate = False
    logger.addHandler(writer)
    try:
        writer.hold(600)
        for n in range(3):
            logger.warning("held line %d", n)
        threading.Event().wait(0.3)  # room for a writer that would not wait
        with pytest.raises(BlockingIOError):
            os.read(read_end, 1 << 16)
        writer.flush()
        held = os.read(read_end, 1 << 16).decode().splitlines()
        assert [json.loads(line)["msg"] for line in held] == [f"held line {n}" for n in range(3)]

        writer.hold(0.2)
        logger.warning("after a short hold")
        received = bytearray()
        while b"after a short hold" not in received:  # the hold ends by itself
            select.select([read_end], [], [], 30)
            received += os.read(read_end, 1 << 16)
    finally:
        logger.removeHandler(writer)
        writer.close()
        stream.close()
        os.close(read_end)


def _read_all(fd: int, into: bytearray) -> None:
    while chunk := os.read(fd, 1 << 16):
        into += chunk
    os.close(fd)


HOOKS_SCRIPT = textwrap.dedent(
    """
    import asyncio, gc, logging, threading, warnings
    from pykata import log as logsetup

    logsetup.setup(logging.INFO, name="hooks", source="test").start()
    logsetup.install_hooks()

    def in_thread():
        raise ValueError("raised in a thread")

    thread = threading.Thread(target=in_thread, name="worker")
    thread.start()
    thread.join()

    class Broken:
        def __del__(self):
            raise KeyError("raised in __del__")

    Broken()
    gc.collect()
    warnings.warn("a warning from a library")
    logging.getLogger("otherlib").error("another library's error")

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(logsetup.loop_exception_handler)

        async def failing():
            raise RuntimeError("task failed and nobody looked")

        task = asyncio.ensure_future(failing())
        await asyncio.sleep(0.01)
        del task
        gc.collect()
        loop.call_soon(lambda: 1 / 0)
        await asyncio.sleep(0.01)

    asyncio.run(main())
    raise SystemError("uncaught at the top")
    """
)


def test_every_way_python_reports_an_error_is_one_json_line() -> None:
    result = subprocess.run(
        [sys.executable, "-c", HOOKS_SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON: no raw traceback
    text = {r["msg"]: r for r in records}
    expected = [
        "raised in a thread",
        "raised in __del__",
        "a warning from a library",
        "another library's error",
        "task failed and nobody looked",
        "division by zero",
        "uncaught at the top",
    ]
    for needle in expected:
        matches = [r for r in records if needle in r["msg"] or needle in r.get("error", "")]
        assert matches, f"{needle!r} not logged; got {list(text)}"
    tracebacks = [r for r in records if "Traceback" in r.get("error", "")]
    assert len(tracebacks) >= 5
    assert {r["subsystem"] for r in records} >= {"log", "py", "otherlib"}
