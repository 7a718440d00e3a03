"""Reading a recorded CTF trace (babeltrace2's Python bindings), summarising
it, and converting it to the Chrome trace-event format.

Events carry the contexts the session added (vpid, vtid, procname, pid_ns);
`containers.json` beside the trace maps container ids to PID namespaces.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import debian

CONTAINERS_FILE = "containers.json"
SPANS_FILE = "spans.jsonl"  # the agent's OpenTelemetry spans of the same run
FIRST_ROW = 100  # Chrome "pid"s of LTTng processes (the agent's spans use 1)


@dataclass(frozen=True)
class Event:
    ns: int  # nanoseconds since the Unix epoch
    name: str
    vpid: int
    vtid: int
    procname: str
    pid_ns: int
    fields: dict[str, Any]


def _bt2() -> Any:
    return debian.import_module("bt2")


def _plain(value: Any) -> Any:
    """A babeltrace2 field value as plain Python."""
    bt2 = _bt2()
    if isinstance(value, bt2._StringFieldConst):
        return str(value)
    if isinstance(value, (bt2._IntegerFieldConst, bt2._RealFieldConst, bt2._BoolFieldConst)):
        return value.__index__() if isinstance(value, bt2._IntegerFieldConst) else float(value)
    if isinstance(value, bt2._StructureFieldConst):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, bt2._ArrayFieldConst):
        return [_plain(v) for v in value]
    return str(value)


def events(trace: Path) -> Iterator[Event]:
    bt2 = _bt2()
    for message in bt2.TraceCollectionMessageIterator(str(trace)):
        if type(message) is not bt2._EventMessageConst:
            continue
        event = message.event
        context = event.common_context_field
        ctx = {k: _plain(v) for k, v in context.items()} if context is not None else {}
        yield Event(
            ns=message.default_clock_snapshot.ns_from_origin,
            name=event.name,
            vpid=int(ctx.get("vpid", 0)),
            vtid=int(ctx.get("vtid", 0)),
            procname=str(ctx.get("procname", "")),
            pid_ns=int(ctx.get("pid_ns", 0)),
            fields={k: _plain(v) for k, v in event.payload_field.items()},
        )


def containers(trace: Path) -> dict[int, str]:
    """PID namespace inode -> container id, as the recorder wrote it."""
    path = trace / CONTAINERS_FILE
    if not path.exists():
        return {}
    return {int(ns): cid for cid, ns in json.loads(path.read_text()).items()}


@dataclass
class Summary:
    count: int
    first_ns: int
    last_ns: int
    by_type: collections.Counter[str]
    by_process: collections.Counter[str]
    by_container: collections.Counter[str]

    def text(self) -> str:
        span = (self.last_ns - self.first_ns) / 1e9 if self.count else 0.0
        lines = [f"{self.count} events over {span:.3f} s"]
        for title, counter in (
            ("per event type", self.by_type),
            ("per process", self.by_process),
            ("per container", self.by_container),
        ):
            lines.append(f"\n{title}:")
            width = max((len(k) for k in counter), default=0)
            lines += [f"  {k:<{width}}  {n:>8}" for k, n in counter.most_common()]
        return "\n".join(lines) + "\n"


def summarise(trace: Path) -> Summary:
    owners = containers(trace)
    by_type: collections.Counter[str] = collections.Counter()
    by_process: collections.Counter[str] = collections.Counter()
    by_container: collections.Counter[str] = collections.Counter()
    first = last = 0
    count = 0
    for e in events(trace):
        count += 1
        first = e.ns if count == 1 else min(first, e.ns)
        last = max(last, e.ns)
        by_type[e.name] += 1
        by_process[f"{e.procname or '?'} ({e.vpid})"] += 1
        by_container[owners.get(e.pid_ns, "(host: agent, runtime)")] += 1
    return Summary(count, first, last, by_type, by_process, by_container)


def chrome(trace: Path) -> list[dict[str, Any]]:
    """Chrome trace events: one instant event per LTTng event, on its process and thread."""
    owners = containers(trace)
    out: list[dict[str, Any]] = []
    # Processes of different containers share pid numbers: one row per (namespace, pid).
    rows: dict[tuple[int, int], int] = {}
    names: dict[int, str] = {}
    for e in events(trace):
        row = rows.setdefault((e.pid_ns, e.vpid), FIRST_ROW + len(rows))
        if e.vtid == e.vpid or row not in names:  # the main thread names the process
            container = owners.get(e.pid_ns)
            names[row] = f"{e.procname} [{container}]" if container else e.procname
        out.append(
            {
                "name": e.name,
                "cat": "lttng",
                "ph": "i",
                "s": "t",
                "ts": e.ns / 1e3,
                "pid": row,
                "tid": e.vtid,
                "args": {**e.fields, "vpid": e.vpid},
            }
        )
    out += [
        {"name": "process_name", "ph": "M", "pid": row, "args": {"name": name}}
        for row, name in names.items()
    ]
    return out
