"""The memory agent: periodic memory compaction and memcg reclaim in the guest.

MemAgentCompactSet and MemAgentMemcgSet change its settings; a field left
unset in the request keeps its current value. Compaction runs every
`period_secs` while memory pressure (PSI "some", over the period) stays
below `period_psi_percent_limit`, by writing to /proc/sys/vm/compact_memory.
Memcg reclaim needs the kernel's multi-generation LRU (/sys/kernel/mm/lru_gen);
where it is absent, enabling it is refused with the reason.

It acts on the whole machine, so it runs only when the agent owns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import FailedPrecondition, InvalidArgument
from .guest import Guest

log = logging.getLogger("pykata.agent.memagent")

PSI_MEMORY = Path("/proc/pressure/memory")
COMPACT_MEMORY = Path("/proc/sys/vm/compact_memory")
LRU_GEN = Path("/sys/kernel/mm/lru_gen/enabled")


@dataclass
class CompactConfig:
    disabled: bool = True
    period_secs: int = 600
    period_psi_percent_limit: int = 1
    compact_psi_percent_limit: int = 5
    compact_sec_max: int = 300
    compact_order: int = 9
    compact_threshold: int = 1024
    compact_force_times: int = 0


@dataclass
class MemcgConfig:
    disabled: bool = True
    swap: bool = False
    swappiness_max: int = 50
    period_secs: int = 600
    period_psi_percent_limit: int = 1
    eviction_psi_percent_limit: int = 1
    eviction_run_aging_count_min: int = 3


Config = TypeVar("Config", CompactConfig, MemcgConfig)


def merged(current: Config, changes: Mapping[str, int | bool]) -> Config:
    """`current` with the settings in `changes` (the request's set fields) replaced."""
    known = {f.name for f in dataclasses.fields(current)}
    wanted: dict[str, Any] = {name: value for name, value in changes.items() if name in known}
    for name, value in wanted.items():
        if name.endswith("percent_limit") and not 0 <= value <= 100:
            raise InvalidArgument(f"{name} {value} is not a percentage (0-100)")
        if name == "period_secs" and value == 0:
            raise InvalidArgument("period_secs must be at least 1")
    return dataclasses.replace(current, **wanted)


class MemAgent:
    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.compact = CompactConfig()
        self.memcg = MemcgConfig()
        self._compactor: asyncio.Task[None] | None = None

    def set_compact(self, changes: Mapping[str, int | bool]) -> None:
        config = merged(self.compact, changes)
        if not config.disabled:
            self.guest.require_ownership("running memory compaction")
        self.compact = config
        log.info("memory agent compaction", extra=dataclasses.asdict(config))
        self._restart_compactor()

    def set_memcg(self, changes: Mapping[str, int | bool]) -> None:
        config = merged(self.memcg, changes)
        if not config.disabled:
            self.guest.require_ownership("running memcg reclaim")
            if not LRU_GEN.exists():
                raise FailedPrecondition(
                    f"memcg reclaim needs the multi-generation LRU ({LRU_GEN}), "
                    "which this kernel lacks"
                )
        self.memcg = config
        log.info("memory agent memcg", extra=dataclasses.asdict(config))

    def _restart_compactor(self) -> None:
        if self._compactor is not None:
            self._compactor.cancel()
            self._compactor = None
        if not self.compact.disabled:
            self._compactor = asyncio.get_running_loop().create_task(self._compact_loop())

    async def _compact_loop(self) -> None:
        config = self.compact
        while True:
            before = _psi_some_total()
            await asyncio.sleep(config.period_secs)
            stalled = (_psi_some_total() - before) / 1e6 / config.period_secs * 100
            if stalled < config.period_psi_percent_limit:
                log.debug("compacting memory", extra={"psi_percent": round(stalled, 2)})
                await asyncio.to_thread(COMPACT_MEMORY.write_text, "1")

    async def stop(self) -> None:
        if self._compactor is not None:
            self._compactor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._compactor


def _psi_some_total() -> int:
    """Microseconds some task stalled on memory since boot (0 without PSI)."""
    try:
        first = PSI_MEMORY.read_text().splitlines()[0]
    except (OSError, IndexError):
        return 0
    return int(first.rpartition("total=")[2])
