"""GetDiagnosticData: what a user needs to see when something went wrong.

log_type selects what (container_id for "termination_log" and "container"):

- termination_log: a Kubernetes container's termination message (upstream's one
  log_type): the file bind-mounted at the container's
  io.kubernetes.container.terminationMessagePath, at most 4 KiB. Unlike
  upstream, only a file in the shared-files directory is read, without
  following symlinks: a spec cannot make the agent read any other guest file;
- agent: the agent's last RECENT_LINES log lines (JSON lines);
- dmesg: the kernel's ring buffer;
- mounts: the agent's /proc/self/mountinfo;
- container: the runtime's state of the container, its processes and cgroup stats (JSON).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from pathlib import Path

from .command import run
from .errors import FailedPrecondition, InvalidArgument
from .sandbox import Sandbox
from .storage import inside

RECENT_LINES = 1000
LOG_TYPES = ("termination_log", "agent", "dmesg", "mounts", "container")
TERMINATION_PATH = "io.kubernetes.container.terminationMessagePath"
#: Kubernetes' own limit for a termination message.
TERMINATION_MESSAGE_LIMIT = 4096


class RecentLogs(logging.Handler):
    """Keeps the agent's last log records; formats them only when asked."""

    def __init__(self, formatter: logging.Formatter, lines: int = RECENT_LINES) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.records: collections.deque[logging.LogRecord] = collections.deque(maxlen=lines)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        return "".join(self._line(record) for record in list(self.records))

    def _line(self, record: logging.LogRecord) -> str:
        # Each record is formatted once, however often it is asked for.
        line = record.__dict__.get("_recent_line")
        if line is None:
            line = record.__dict__["_recent_line"] = self.format(record) + "\n"
        return line


class Diagnostics:
    def __init__(self, sandbox: Sandbox, recent: RecentLogs | None, shared: Path) -> None:
        self.sandbox = sandbox
        self.recent = recent
        #: Where termination messages may be read from (the shared-files directory).
        self.shared = shared

    async def data(self, log_type: str, container_id: str) -> str:
        if log_type == "termination_log":
            return self._termination_log(container_id)
        if log_type == "agent":
            return self.recent.text() if self.recent else ""
        if log_type == "dmesg":
            return (await run("dmesg")).decode(errors="replace")
        if log_type == "mounts":
            return Path("/proc/self/mountinfo").read_text()
        if log_type == "container":
            return await self._container(container_id)
        raise InvalidArgument(f"log_type {log_type!r} is unknown; known: {', '.join(LOG_TYPES)}")

    def _termination_log(self, container_id: str) -> str:
        config = self.sandbox.container(container_id).config
        destination = (config.get("annotations") or {}).get(TERMINATION_PATH)
        if not destination:
            raise FailedPrecondition(f"container {container_id} has no {TERMINATION_PATH}")
        source = next(
            (
                m.get("source", "")
                for m in config.get("mounts") or []
                if m.get("destination") == destination
            ),
            None,
        )
        if source is None:
            raise FailedPrecondition(
                f"container {container_id}: no mount at its termination message path {destination}"
            )
        try:
            path = inside(self.shared, source, "termination message source")
        except InvalidArgument as exc:  # the container's mounts are the problem, not the call
            raise FailedPrecondition(f"container {container_id}: {exc.message}") from None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return ""  # no message written
        with os.fdopen(fd, "rb") as f:
            return f.read(TERMINATION_MESSAGE_LIMIT).decode(errors="replace")

    async def _container(self, container_id: str) -> str:
        if not container_id:
            raise InvalidArgument('log_type "container" needs a container_id')
        container = self.sandbox.container(container_id)
        state = await container.runtime_state()
        stats = dataclasses.asdict(container.stats())
        report = {
            "state": state,
            "execs": sorted(container.execs),
            "cgroup": container.cgroup,
            "cgroup_stats": stats,
        }
        return json.dumps(report, indent=1) + "\n"
