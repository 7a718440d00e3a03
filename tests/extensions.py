"""What the tests of pykata.Extensions share: an agent with a sandbox, and
containers in it, driven through the upstream API."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from pykata.api import agent_pb2

from .containers import spec


async def start_container(api: Any, rootfs: Path, cid: str, *args: str) -> None:
    await api.CreateContainer(
        agent_pb2.CreateContainerRequest(container_id=cid, OCI=spec(rootfs, *args))
    )
    await api.StartContainer(agent_pb2.StartContainerRequest(container_id=cid))


def init_pid(run_dir: Path, cid: str) -> int:
    return int((run_dir / "containers" / cid / "init.pid").read_text())


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def established(pid: int, port: int) -> int:
    """TCP connections to or from `port` in the network namespace of `pid`."""
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            ports = {int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)}
            # A socket someone holds (TIME_WAIT has no inode), not listening (0A).
            if port in ports and state != "0A" and inode != "0":
                count += 1
    return count


async def eventually(check: Any, timeout: float = 10.0) -> None:
    """Until `check()` is true (state that settles asynchronously, never timing)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"{check} did not hold within {timeout}s")
        await asyncio.sleep(0.05)
