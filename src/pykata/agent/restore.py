"""Parked for a snapshot, woken as a new guest (a pykata extension; docs/vm.md, Snapshots).

With `agent.restore_addr=serial://NAME` the agent does all its start-up work,
then, before serving anything, says so on that virtio-serial port
(`{"parked": true}`) and waits. The host saves the machine there. Every guest
restored from that snapshot wakes in this wait, as a copy of the same
machine: the same kernel entropy pool, the same clock reading, the same
Python random state. The host's launcher then sends one line

    {"generation": 7, "time_ns": 1764670000123456789, "entropy": "<64..1024 hex digits>"}

and the agent, before it answers any call, mixes the entropy into the kernel's
pool and reseeds the kernel's CRNG and Python's `random`, sets the clock, and
answers `{"restored": 7}`. A bad line is answered `{"error": "..."}` and the
agent keeps waiting: nothing is served until a restore succeeded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from .. import log as logsetup
from ..transport.address import SerialAddress, parse_address
from ..transport.serial import find_port
from .command import run
from .errors import AgentError, InvalidArgument, NotFound
from .guest import Guest

log = logging.getLogger("pykata.agent.restore")

#: The longest line the host may send (the entropy dominates): bounded like every input.
MAX_LINE = 4096
MIN_ENTROPY_BYTES = 32
MAX_ENTROPY_BYTES = 512
#: How often to look again while the line has not come (a restored guest reads it
#: at its first look: the launcher sends it before the guest runs).
HOST_POLL = 0.005
#: How long a restored agent's log lines wait before they are written: on a serial
#: console under software emulation writing them costs the guest's one CPU about as
#: much as serving the first call (docs/vm.md, Snapshots).
LOG_HOLD_SECONDS = 0.5
#: virtio-fs tags are at most 36 bytes (the device's config space).
MAX_TAG = 36
#: How long a hotplugged virtio-fs device may take to appear in the guest.
SHARE_SECONDS = 20.0
VIRTIOFS_DRIVER = Path("/sys/bus/virtio/drivers/virtiofs")


@dataclass(frozen=True)
class Restore:
    """What the launcher tells a restored guest."""

    generation: int
    time_ns: int
    entropy: bytes
    #: A shared directory's virtio-fs tag, hotplugged after the restore: wait for it.
    share: str = ""


def parse(line: bytes) -> Restore:
    """The launcher's line; InvalidArgument naming what is wrong with it."""
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise InvalidArgument(f"restore message is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise InvalidArgument("restore message must be a JSON object")
    generation, time_ns, entropy = (message.get(k) for k in ("generation", "time_ns", "entropy"))
    if not isinstance(generation, int) or generation < 1:
        raise InvalidArgument("restore message: generation must be an integer >= 1")
    if not isinstance(time_ns, int) or time_ns <= 0:
        raise InvalidArgument("restore message: time_ns must be a positive integer")
    try:
        data = bytes.fromhex(entropy) if isinstance(entropy, str) else b""
    except ValueError:
        data = b""
    if not MIN_ENTROPY_BYTES <= len(data) <= MAX_ENTROPY_BYTES:
        raise InvalidArgument(
            f"restore message: entropy must be {MIN_ENTROPY_BYTES}..{MAX_ENTROPY_BYTES} bytes "
            "in hex"
        )
    share = message.get("share", "")
    if not isinstance(share, str) or len(share) > MAX_TAG:
        raise InvalidArgument(f"restore message: share must be a virtio-fs tag (<= {MAX_TAG})")
    return Restore(generation, time_ns, data, share)


def become_new_guest(restore: Restore, guest: Guest) -> None:
    """Nothing of the snapshot's life carries over: entropy and clock are this guest's."""
    guest.reseed_random(restore.entropy)
    random.seed(restore.entropy)
    time.clock_settime_ns(time.CLOCK_REALTIME, restore.time_ns)


async def wait_for_share(tag: str) -> None:
    """Until the hotplugged virtio-fs device is bound to its driver (mountable by tag)."""
    await run("modprobe", "virtiofs")
    deadline = time.monotonic() + SHARE_SECONDS
    while not any(VIRTIOFS_DRIVER.glob("virtio*")):
        if time.monotonic() > deadline:
            raise NotFound(f"the shared directory {tag!r} did not appear in {SHARE_SECONDS:.0f}s")
        await asyncio.sleep(0.02)


def _hold_log_output() -> None:
    writer = logsetup.writer()
    if writer is not None:
        writer.hold(LOG_HOLD_SECONDS)


class _Port:
    """The restore port, non-blocking: reads b"" and writes EAGAIN while no host is there."""

    def __init__(self, address: SerialAddress) -> None:
        self.fd = os.open(
            find_port(address.name, timeout=5.0), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC
        )
        self._skipping = False  # the rest of a line that was too long

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                await asyncio.sleep(HOST_POLL)  # no host connected yet

    async def read_line(self) -> bytes:
        """The next line; InvalidArgument for one over MAX_LINE (its rest is skipped)."""
        line = bytearray()
        while True:
            try:
                data = os.read(self.fd, MAX_LINE + 1)
            except BlockingIOError:
                data = None
            if not data:  # nothing yet (None), or no host connected (b"")
                if data == b"":
                    line.clear()  # a host that left mid-line: its start is void
                await asyncio.sleep(HOST_POLL)
                continue
            line += data
            end = line.find(b"\n")
            if self._skipping:
                if end < 0:
                    line.clear()
                    continue
                self._skipping = False
                del line[: end + 1]
                end = line.find(b"\n")
            if end > MAX_LINE or (end < 0 and len(line) > MAX_LINE):
                self._skipping = end < 0
                raise InvalidArgument(f"restore message longer than {MAX_LINE} bytes")
            if end >= 0:
                return bytes(line[:end])

    def close(self) -> None:
        os.close(self.fd)


async def park_until_restored(address: str, guest: Guest) -> Restore:
    """Say we are parked, then wait for the launcher's restore line and act on it."""
    guest.require_ownership("waiting to be restored")
    parsed = parse_address(address)
    if not isinstance(parsed, SerialAddress):
        raise InvalidArgument(f"agent.restore_addr {address!r} must be a serial:// port")
    port = _Port(parsed)
    try:
        await port.write(b'{"parked": true}\n')
        log.info("parked: waiting to be restored", extra={"address": address})
        while True:
            try:
                line = await port.read_line()
                received = time.monotonic()
                _hold_log_output()
                restore = parse(line)
                become_new_guest(restore, guest)
                if restore.share:
                    await wait_for_share(restore.share)
            except (AgentError, OSError) as exc:
                log.error("restore refused: %s", exc)
                await port.write(json.dumps({"error": str(exc)}).encode() + b"\n")
                continue
            await port.write(json.dumps({"restored": restore.generation}).encode() + b"\n")
            handled_ms = round((time.monotonic() - received) * 1e3, 1)
            log.info("restored", extra={"generation": restore.generation, "handled_ms": handled_ms})
            return restore
    finally:
        port.close()
