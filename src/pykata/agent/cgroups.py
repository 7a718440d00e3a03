"""Reading a container's cgroup (v1 or v2) and removing it when it is empty."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def is_v2() -> bool:
    return (ROOT / "cgroup.controllers").exists()


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _int(path: Path) -> int:
    text = _read(path)
    if text is None:
        return 0
    text = text.strip()
    return 0 if text in ("", "max") else int(text.split()[0])


def _kv(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


def _dir(controller: str, cgroup: str) -> Path:
    rel = cgroup.lstrip("/")
    return ROOT / rel if is_v2() else ROOT / controller / rel


@dataclass
class CgroupStats:
    """A container's cgroup counters, v1 or v2 alike (times in ns, memory in bytes)."""

    cpu_total: int = 0
    cpu_per_cpu: list[int] = field(default_factory=list)
    cpu_user: int = 0
    cpu_system: int = 0
    throttle_periods: int = 0
    throttled_periods: int = 0
    throttled_time: int = 0
    memory_usage: int = 0
    memory_max_usage: int = 0
    memory_failcnt: int = 0
    memory_limit: int = 0
    memory_cache: int = 0
    memory_stat: dict[str, int] = field(default_factory=dict)
    pids_current: int = 0
    pids_limit: int = 0


def stats(cgroup: str) -> CgroupStats:
    return _stats_v2(cgroup) if is_v2() else _stats_v1(cgroup)


def _stats_v1(cgroup: str) -> CgroupStats:
    cpuacct = _dir("cpuacct", cgroup)
    ticks = _kv(cpuacct / "cpuacct.stat")
    hz = os.sysconf("SC_CLK_TCK")
    throttle = _kv(_dir("cpu", cgroup) / "cpu.stat")
    memory = _dir("memory", cgroup)
    memory_stat = _kv(memory / "memory.stat")
    pids = _dir("pids", cgroup)
    return CgroupStats(
        cpu_total=_int(cpuacct / "cpuacct.usage"),
        cpu_per_cpu=[int(v) for v in (_read(cpuacct / "cpuacct.usage_percpu") or "").split()],
        cpu_user=ticks.get("user", 0) * 1_000_000_000 // hz,
        cpu_system=ticks.get("system", 0) * 1_000_000_000 // hz,
        throttle_periods=throttle.get("nr_periods", 0),
        throttled_periods=throttle.get("nr_throttled", 0),
        throttled_time=throttle.get("throttled_time", 0),
        memory_usage=_int(memory / "memory.usage_in_bytes"),
        memory_max_usage=_int(memory / "memory.max_usage_in_bytes"),
        memory_failcnt=_int(memory / "memory.failcnt"),
        memory_limit=_int(memory / "memory.limit_in_bytes"),
        memory_cache=memory_stat.get("cache", 0),
        memory_stat=memory_stat,
        pids_current=_int(pids / "pids.current"),
        pids_limit=_int(pids / "pids.max"),
    )


def _stats_v2(cgroup: str) -> CgroupStats:
    d = _dir("", cgroup)
    cpu = _kv(d / "cpu.stat")
    memory_stat = _kv(d / "memory.stat")
    return CgroupStats(
        cpu_total=cpu.get("usage_usec", 0) * 1000,
        cpu_user=cpu.get("user_usec", 0) * 1000,
        cpu_system=cpu.get("system_usec", 0) * 1000,
        throttle_periods=cpu.get("nr_periods", 0),
        throttled_periods=cpu.get("nr_throttled", 0),
        throttled_time=cpu.get("throttled_usec", 0) * 1000,
        memory_usage=_int(d / "memory.current"),
        memory_max_usage=_int(d / "memory.peak"),
        memory_limit=_int(d / "memory.max"),
        memory_failcnt=_kv(d / "memory.events").get("max", 0),
        memory_cache=memory_stat.get("file", 0),
        memory_stat=memory_stat,
        pids_current=_int(d / "pids.current"),
        pids_limit=_int(d / "pids.max"),
    )


def processes(cgroup: str) -> list[int]:
    """Every process in the cgroup (crun's `ps` crashes once they are gone)."""
    text = _read(_dir("freezer", cgroup) / "cgroup.procs") or ""
    return [int(pid) for pid in text.split()]


def _freeze(cgroup: str, frozen: bool) -> None:
    if is_v2():
        path, value = _dir("", cgroup) / "cgroup.freeze", "1" if frozen else "0"
    else:
        path, value = _dir("freezer", cgroup) / "freezer.state", "FROZEN" if frozen else "THAWED"
    with contextlib.suppress(OSError):  # no freezer: signal without it
        path.write_text(value)


@contextlib.asynccontextmanager
async def frozen(cgroup: str, settle: float = 1.0) -> AsyncIterator[None]:
    """The cgroup frozen (no process in it can run or fork) meanwhile; thawed after."""
    _freeze(cgroup, True)
    try:
        deadline = time.monotonic() + settle
        while freezer_state(cgroup) == "FREEZING" and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        yield
    finally:
        _freeze(cgroup, False)


def freezer_state(cgroup: str) -> str:
    if is_v2():
        return "FROZEN" if _int(_dir("", cgroup) / "cgroup.freeze") else "THAWED"
    return (_read(_dir("freezer", cgroup) / "freezer.state") or "").strip()


def memory_limit(cgroup: str) -> int:
    name = "memory.max" if is_v2() else "memory.limit_in_bytes"
    return _int(_dir("memory", cgroup) / name)


def remove(cgroup: str, stop_at: str) -> None:
    """Remove the (empty) cgroup and its empty parents up to `stop_at`, in every hierarchy."""
    for base in [ROOT] if is_v2() else _v1_hierarchies():
        path = base / cgroup.lstrip("/")
        stop = base / stop_at.lstrip("/")
        while path != base and (path == stop or stop in path.parents):
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                break
            if path == stop:
                break
            path = path.parent


@functools.cache
def _v1_hierarchies() -> tuple[Path, ...]:
    """The mounted v1 hierarchies: looked up once (the agent mounts them before it
    serves), not on every container's removal (some 45 system calls)."""
    return tuple(p for p in ROOT.iterdir() if p.is_dir() and os.path.ismount(p))


def exists(cgroup: str) -> bool:
    if is_v2():
        return _dir("", cgroup).exists()
    return any((p / cgroup.lstrip("/")).exists() for p in ROOT.iterdir() if p.is_dir())
