"""Structured logs: one JSON object per line on stderr, as the upstream agent writes.

Every line has msg, level, ts, subsystem, pid, source and name; ids and
other context passed with `extra=` become fields of their own.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Any, TextIO

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

#: Level names as the upstream (slog) agent writes them.
_LEVEL_NAMES = {
    logging.CRITICAL: "CRIT",
    logging.ERROR: "ERRO",
    logging.WARNING: "WARN",
    logging.INFO: "INFO",
    logging.DEBUG: "DEBG",
    TRACE: "TRCE",
}

#: Level names a user may give (-l/--log-level), as upstream's tools accept them.
LEVELS = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
}

_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "subsystem",
}


class JsonFormatter(logging.Formatter):
    def __init__(self, name: str, source: str) -> None:
        super().__init__()
        self._name = name
        self._source = source

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        line: dict[str, Any] = {
            "msg": record.getMessage(),
            "level": _LEVEL_NAMES.get(record.levelno, record.levelname),
            "ts": ts.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "subsystem": getattr(record, "subsystem", None) or _subsystem(record.name),
            "pid": str(os.getpid()),
            "source": self._source,
            "name": self._name,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                line[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def _subsystem(logger_name: str) -> str:
    # "pykata.ttrpc.server" -> "ttrpc"; the package root itself is "root"
    parts = logger_name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "pykata" else "root"


def setup(level: int, *, name: str, source: str, stream: TextIO | None = None) -> None:
    """Send every pykata log record to `stream` (stderr) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(name, source))
    root = logging.getLogger("pykata")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
