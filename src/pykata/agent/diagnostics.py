"""GetDiagnosticData: what a user needs to see when something went wrong.

log_type selects what (container_id only for "container"):

- agent: the agent's last RECENT_LINES log lines (JSON lines);
- dmesg: the kernel's ring buffer;
- mounts: the agent's /proc/self/mountinfo;
- container: the runtime's state of the container, its processes and cgroup stats (JSON).
"""

from __future__ import annotations

import collections
import json
import logging
from pathlib import Path

from google.protobuf import json_format

from . import cgroups
from .command import run
from .errors import InvalidArgument
from .sandbox import Sandbox

RECENT_LINES = 1000
LOG_TYPES = ("agent", "dmesg", "mounts", "container")


class RecentLogs(logging.Handler):
    """Keeps the agent's last log records; formats them only when asked."""

    def __init__(self, formatter: logging.Formatter, lines: int = RECENT_LINES) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.records: collections.deque[logging.LogRecord] = collections.deque(maxlen=lines)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        return "".join(self.format(record) + "\n" for record in list(self.records))


class Diagnostics:
    def __init__(self, sandbox: Sandbox, recent: RecentLogs | None) -> None:
        self.sandbox = sandbox
        self.recent = recent

    async def data(self, log_type: str, container_id: str) -> str:
        if log_type == "agent":
            return self.recent.text() if self.recent else ""
        if log_type == "dmesg":
            return (await run("dmesg")).decode(errors="replace")
        if log_type == "mounts":
            return Path("/proc/self/mountinfo").read_text()
        if log_type == "container":
            return await self._container(container_id)
        raise InvalidArgument(f"log_type {log_type!r} is unknown; known: {', '.join(LOG_TYPES)}")

    async def _container(self, container_id: str) -> str:
        if not container_id:
            raise InvalidArgument('log_type "container" needs a container_id')
        container = self.sandbox.container(container_id)
        state = await self.sandbox.runtime.state(container_id)
        stats = json_format.MessageToDict(cgroups.stats(container.cgroup))
        report = {
            "state": state,
            "execs": sorted(container.execs),
            "cgroup": container.cgroup,
            "cgroup_stats": stats,
        }
        return json.dumps(report, indent=1) + "\n"
