"""Guest-wide operations: details, CPU and memory onlining, clock, entropy, swap.

Operations that change the machine (clock, onlining, memory probing, swap,
the memory agent) act only when the agent owns the machine - it runs as
PID 1 in a guest, or was told so with `agent.owns_machine`. Stand-alone on
a host they are refused with FAILED_PRECONDITION: a development agent must
not set the host's clock or swap.
"""

from __future__ import annotations

import asyncio
import fcntl
import glob
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from .command import run
from .errors import FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger("pykata.agent.guest")

RNDRESEEDCRNG = 0x5207  # <linux/random.h>: reseed the kernel's CRNG now


@dataclass
class GuestDetails:
    mem_block_size: int
    mem_hotplug_probe: bool
    init_daemon: bool
    storage_handlers: list[str]
    supports_seccomp: bool
    version: str = __version__
    extra_features: list[str] = field(default_factory=list)


class Guest:
    def __init__(self, *, owns_machine: bool, sysfs: Path = Path("/sys")) -> None:
        self.owns_machine = owns_machine
        self.sysfs = sysfs

    def require_ownership(self, what: str) -> None:
        if not self.owns_machine:
            raise FailedPrecondition(
                f"not {what}: the agent runs stand-alone on a host and this would change the "
                "host (run it as PID 1 in a guest, or set agent.owns_machine)"
            )

    # --- details ------------------------------------------------------------------

    def details(self, storage_handlers: list[str], seccomp: bool) -> GuestDetails:
        memory = self.sysfs / "devices/system/memory"
        try:
            block_size = int((memory / "block_size_bytes").read_text().strip(), 16)
        except (OSError, ValueError):
            block_size = 0  # no memory hotplug support in this kernel
        return GuestDetails(
            mem_block_size=block_size,
            mem_hotplug_probe=(memory / "probe").exists(),
            init_daemon=os.getpid() == 1,
            storage_handlers=storage_handlers,
            supports_seccomp=seccomp,
        )

    # --- CPU and memory -----------------------------------------------------------

    async def online_cpu_mem(self, nb_cpus: int, cpu_only: bool, wait: bool) -> None:
        self.require_ownership("onlining CPUs and memory")
        if nb_cpus:
            onlined = await self._online("devices/system/cpu/cpu[0-9]*/online", "1", nb_cpus, wait)
            if onlined < nb_cpus:
                raise FailedPrecondition(
                    f"onlined {onlined} of {nb_cpus} CPUs: no more offline CPUs appeared"
                )
        if not cpu_only:
            await self._online("devices/system/memory/memory[0-9]*/online", "1", 0, False)

    async def _online(self, pattern: str, value: str, wanted: int, wait: bool) -> int:
        """Write `value` to every offline `pattern` file (at most `wanted`, if set)."""
        onlined = 0
        deadline = time.monotonic() + (3.0 if wait else 0.0)
        while True:
            for path in sorted(glob.glob(str(self.sysfs / pattern))):
                if wanted and onlined >= wanted:
                    return onlined
                if Path(path).read_text().strip() == "0":
                    Path(path).write_text(value)
                    onlined += 1
            if not wanted or onlined >= wanted or time.monotonic() >= deadline:
                return onlined
            await asyncio.sleep(0.05)  # hot-added CPUs show up in sysfs a little later

    def hotplug_by_probe(self, addresses: list[int]) -> None:
        self.require_ownership("probing hot-plugged memory")
        probe = self.sysfs / "devices/system/memory/probe"
        if not probe.exists():
            raise FailedPrecondition(f"this kernel has no {probe} (CONFIG_ARCH_MEMORY_PROBE)")
        for address in addresses:
            probe.write_text(f"{address:#x}")

    # --- clock and entropy --------------------------------------------------------

    def set_date_time(self, sec: int, usec: int) -> None:
        self.require_ownership("setting the clock")
        if not 0 <= usec < 1_000_000:
            raise InvalidArgument(f"Usec {usec} must be within 0..999999")
        time.clock_settime(time.CLOCK_REALTIME, sec + usec / 1e6)

    def reseed_random(self, data: bytes) -> None:
        """Mix `data` into the kernel's entropy pool and reseed.

        Allowed stand-alone: mixing in more bytes can never weaken the pool.
        """
        if not data:
            raise InvalidArgument("ReseedRandomDev needs data to mix in")
        with open("/dev/random", "wb", buffering=0) as random:
            random.write(data)
            try:
                fcntl.ioctl(random, RNDRESEEDCRNG)
            except PermissionError:
                log.debug("not allowed to reseed the CRNG now; the data is mixed in")

    # --- swap ---------------------------------------------------------------------

    async def add_swap_device(self, pci_path: list[int]) -> None:
        self.require_ownership("adding swap")
        if not pci_path:
            raise InvalidArgument("AddSwap needs the swap device's PCIPath")
        device = self._block_device(pci_path)
        await run("mkswap", device)
        await run("swapon", device)

    async def add_swap_path(self, path: str) -> None:
        self.require_ownership("adding swap")
        if not os.path.isabs(path) or not os.path.exists(path):
            raise NotFound(f"swap file {path!r} does not exist")
        await run("swapon", path)

    def _block_device(self, pci_path: list[int]) -> str:
        """/dev/<name> of the block device at a PCI path (slot numbers bridge by bridge)."""
        here = self.sysfs / "devices/pci0000:00"
        for slot in pci_path:
            found = sorted(here.glob(f"0000:*:{slot:02x}.0"))
            if not found:
                shown = "/".join(f"{s:02x}" for s in pci_path)
                raise NotFound(f"no PCI device at path {shown} (slot {slot:02x} under {here})")
            here = found[0]
        blocks = sorted(here.glob("**/block/*"))
        if not blocks:
            raise NotFound(f"PCI device {here.name} has no block device")
        return f"/dev/{blocks[0].name}"
