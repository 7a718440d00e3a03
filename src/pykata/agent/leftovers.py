"""What an agent that died (kill -9, a crash) left in its run directory.

An agent started on the same run directory removes it all before it serves,
so a container id the dead agent was creating can be created again: the
runtime invocations it had running, the sandbox's namespace holder, every
container's processes, cgroups, runtime state and bundle, and CopyFile's
partial files. Each removal is one log line. With nothing left behind this
costs two directory listings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

from . import cgroups
from .copyfile import SharedFiles
from .errors import RuntimeFailure
from .fdwait import until_ready
from .ids import is_valid_id
from .partials import UPLOADS_DIR, PartialNotes
from .runtime import OciRuntime

log = logging.getLogger("pykata.agent.leftovers")

#: The sandbox's namespace holder: "PID START-TIME", so a reused pid is never killed.
HOLDER_FILE = "holder"
#: How long a killed container's processes may take to leave their cgroup.
CGROUP_EMPTY_TIMEOUT = 5.0
#: How long the killed runtime processes of a previous agent get to exit.
RUNTIME_EXIT_TIMEOUT = 5.0


def process_start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat: tells a process from a later one with its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def record_holder(sandbox_dir: Path, pid: int) -> None:
    (sandbox_dir / HOLDER_FILE).write_text(f"{pid} {process_start_time(pid)}\n")


async def clean(run_dir: Path, runtime: OciRuntime, shared: SharedFiles) -> None:
    bundles, state = run_dir / "containers", runtime.root
    ids = {*_entries(bundles), *_entries(state)}
    holder = run_dir / "sandbox" / HOLDER_FILE
    if ids or holder.exists():
        # Gone, not only signalled: a runtime still dying could make a cgroup after we
        # removed it.
        await _until_gone(_kill_runtime_invocations(state))
        _kill_holder(holder)
    for container_id in sorted(ids):
        await _remove_container(container_id, bundles / container_id, runtime)
    shutil.rmtree(run_dir / "sandbox", ignore_errors=True)
    partials = shared.remove_partials()
    if partials:
        log.warning("removed %d partial CopyFile file(s) of a previous agent", partials)
    PartialNotes(run_dir / UPLOADS_DIR).remove_left()


def _entries(directory: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(directory) if e.is_dir() and is_valid_id(e.name)]
    except FileNotFoundError:
        return []


def _kill_runtime_invocations(state: Path) -> list[int]:
    """Kill the crun/runc processes of the dead agent (they name its runtime state
    directory); the pids signalled."""
    killed = []
    marker = f"\0--root\0{state}\0".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        if marker in b"\0" + cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
                log.warning("killed a previous agent's runtime process %s", entry.name)
    return killed


async def _until_gone(pids: list[int]) -> None:
    """Until each process has exited (at most RUNTIME_EXIT_TIMEOUT seconds in all)."""
    deadline = time.monotonic() + RUNTIME_EXIT_TIMEOUT
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            await asyncio.wait_for(until_ready(pidfd), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            log.warning("a previous agent's runtime process %d did not exit", pid)
        finally:
            os.close(pidfd)


def _kill_holder(holder: Path) -> None:
    try:
        pid_text, start_time = holder.read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return
    if process_start_time(pid) == start_time:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            log.warning("killed a previous agent's sandbox holder %d", pid)


async def _remove_container(container_id: str, bundle: Path, runtime: OciRuntime) -> None:
    cgroup = _cgroup_of(bundle)
    if cgroup:
        async with cgroups.frozen(cgroup):
            for pid in cgroups.processes(cgroup):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(RuntimeFailure):
        await runtime.delete(container_id, force=True)
    if cgroup:
        deadline = time.monotonic() + CGROUP_EMPTY_TIMEOUT
        while cgroups.processes(cgroup) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cgroups.remove(cgroup, stop_at=str(Path(cgroup).parent))
    shutil.rmtree(bundle, ignore_errors=True)
    log.warning(
        "removed container %s left by a previous agent", container_id,
        extra={"container": container_id, "cgroup": cgroup},
    )  # fmt: skip


def _cgroup_of(bundle: Path) -> str:
    try:
        config = json.loads((bundle / "config.json").read_text())
        return str(config["linux"]["cgroupsPath"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""
