"""The restore line a launcher sends a guest restored from a snapshot (agent/restore.py):
what is refused and why, and the bound on its length. The handshake itself runs in a
real restored guest in tests/test_vm_snapshot.py; here the port is a pty (no guest)."""

from __future__ import annotations

import asyncio
import json
import os
import tty

import pytest

from pykata.agent.errors import InvalidArgument
from pykata.agent.restore import MAX_LINE, _Port, parse
from pykata.transport.address import SerialAddress

ENTROPY = "ab" * 32


def line(**fields: object) -> bytes:
    return json.dumps({"generation": 1, "time_ns": 10**18, "entropy": ENTROPY, **fields}).encode()


def test_a_good_line_is_taken() -> None:
    restore = parse(line(generation=7, share="kataShared"))
    assert (restore.generation, restore.time_ns, restore.share) == (7, 10**18, "kataShared")
    assert restore.entropy == bytes.fromhex(ENTROPY)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (line(generation=0), "generation"),
        (line(generation="1"), "generation"),
        (line(time_ns=-5), "time_ns"),
        (line(entropy="ab" * 31), "entropy"),  # fewer than 32 bytes: not enough to reseed
        (line(entropy="zz" * 40), "entropy"),
        (line(entropy="ab" * 513), "entropy"),
        (line(share="x" * 37), "share"),
        (line(share=5), "share"),
    ],
)
def test_a_bad_line_is_refused_naming_the_problem(text: bytes, named: str) -> None:
    with pytest.raises(InvalidArgument, match=named):
        parse(text)


async def test_a_line_longer_than_the_bound_is_refused_and_the_next_one_read() -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    port = _Port(SerialAddress(os.ttyname(slave)))
    try:
        os.write(master, b"x" * (MAX_LINE + 10) + b"\n")
        with pytest.raises(InvalidArgument, match=f"longer than {MAX_LINE} bytes"):
            await asyncio.wait_for(port.read_line(), 10)
        os.write(master, line() + b"\n")
        # The rest of the long line is skipped: the next line read is the good one.
        assert parse(await asyncio.wait_for(port.read_line(), 10)).generation == 1
    finally:
        port.close()
        os.close(master)
        os.close(slave)
