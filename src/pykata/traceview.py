"""kata-trace-view: look at spans - a waterfall in the terminal, or Chrome trace JSON.

Reads OTLP/JSON: the lines `kata-trace-forwarder --output FILE` writes (and
the base64-id files of its older versions), or any OTLP/JSON document other
tools write, one per line or spread over lines. A trace may cross services
(kata-agent-ctl --trace, the agent): a span whose service differs from its
parent's shows the service's name in brackets.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from . import otlpjson
from .clihelp import Formatter

#: OTLP's span kinds (opentelemetry-proto trace.proto Span.SpanKind).
KINDS = {0: "", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}

EPILOG = """\
examples:
  kata-trace-view spans.jsonl                        # every trace, as a tree with a waterfall
  kata-trace-view spans.jsonl --list                 # the traces: id, start, length, spans
  kata-trace-view spans.jsonl --trace 4bf9 --from 120ms --to 180ms
  kata-trace-view spans.jsonl --chrome trace.json    # for ui.perfetto.dev, chrome://tracing

A trace's bars are scaled to the spans under its root: a root that lives
much longer (the agent's own span, which lasts as long as the agent) is
drawn cut, with < or > where it goes on.
"""


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    service: str = ""
    kind: str = ""
    failed: bool = False

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


class ViewError(ValueError):
    """Input or options the view cannot use; the message says which and why."""


def documents(text: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of each document: one a line (as the forwarder writes
    them), or any number spread over lines (as other tools may write one)."""
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            if any(line.strip() for line in lines[: number - 1]):
                raise ViewError(f"line {number} is not JSON: {exc.msg}") from None
            yield from _spread(text)  # not one document a line
            return
        yield number, data


def _spread(text: str) -> Iterator[tuple[int, Any]]:
    decoder = json.JSONDecoder()
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position == len(text):
            return
        number = text.count("\n", 0, position) + 1
        try:
            data, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise ViewError(f"line {exc.lineno} is not JSON: {exc.msg}") from None
        yield number, data


def read_spans(text: str | Iterable[str]) -> list[Span]:
    """The spans of OTLP/JSON text (or its lines)."""
    if not isinstance(text, str):
        text = "\n".join(line.rstrip("\n") for line in text)
    spans = []
    for number, data in documents(text):
        try:
            request = otlpjson.from_data(data)
        except ValueError as exc:
            raise ViewError(f"line {number} is not an OTLP JSON request: {exc}") from None
        for resource in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope in resource.scope_spans:
                for s in scope.spans:
                    attributes = {a.key: json_format.MessageToDict(a.value) for a in s.attributes}
                    spans.append(
                        Span(
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            s.name,
                            s.start_time_unix_nano,
                            s.end_time_unix_nano,
                            {k: next(iter(v.values()), "") for k, v in attributes.items()},
                            service,
                            KINDS.get(s.kind, str(s.kind)),
                            s.status.code == 2,  # STATUS_CODE_ERROR
                        )
                    )
    return spans


# --- choosing ---------------------------------------------------------------------------


def traces(spans: list[Span]) -> list[list[Span]]:
    """The spans by trace, the earliest trace first."""
    by_trace: dict[str, list[Span]] = defaultdict(list)
    for span in spans:
        by_trace[span.trace_id].append(span)
    return sorted(by_trace.values(), key=lambda m: min(s.start_ns for s in m))


def choose_trace(spans: list[Span], prefix: str) -> list[Span]:
    """The spans of the one trace whose id starts with `prefix`."""
    prefix = prefix.lower()
    ids = sorted({s.trace_id for s in spans if s.trace_id.startswith(prefix)})
    if not ids:
        raise ViewError(f"no trace {prefix!r} here; --list shows the traces")
    if len(ids) > 1:
        raise ViewError(f"{len(ids)} traces start with {prefix!r}: {', '.join(ids[:5])} ...")
    return [s for s in spans if s.trace_id == ids[0]]


def window(
    spans: list[Span], start: float | None, end: float | None
) -> tuple[list[Span], tuple[int, int] | None]:
    """The spans that overlap [start, end] (seconds after the first span began), and
    that time in nanoseconds; all of them and None without a window."""
    if not spans or (start is None and end is None):
        return spans, None
    origin = min(s.start_ns for s in spans)
    low = origin + int((start or 0) * 1e9)
    high = origin + int(end * 1e9) if end is not None else max(s.end_ns for s in spans)
    if high <= low:
        raise ViewError("--to must be after --from")
    return [s for s in spans if s.end_ns >= low and s.start_ns <= high], (low, high)


def offset(text: str) -> float:
    """--from/--to: seconds after the first span, `1.5`, `250ms`, `2s`, `1m`."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(us|ms|s|m)?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time (1.5, 250ms, 2s, 1m)")
    return float(match.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60}.get(
        match.group(2) or "s", 1
    )


def listing(spans: list[Span]) -> str:
    lines = []
    for members in traces(spans):
        start = min(s.start_ns for s in members)
        total = (max(s.end_ns for s in members) - start) / 1e6
        roots = _roots(members)
        root = roots[0].name if roots else ""
        when = _clock(start)
        lines.append(
            f"{members[0].trace_id}  {when}  {total:12.3f} ms  {len(members):5} span(s)  {root}"
        )
    return "\n".join(lines)


def _clock(ns: int) -> str:
    moment = datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


# --- the waterfall ----------------------------------------------------------------------


def _roots(members: list[Span]) -> list[Span]:
    ids = {s.span_id for s in members}
    return [s for s in members if s.parent_id not in ids]


def waterfall(spans: list[Span], width: int = 40, bounds: tuple[int, int] | None = None) -> str:
    """Each trace as a tree, with a bar showing when each span ran."""
    out: list[str] = []
    for members in traces(spans):
        out += _trace_lines(members, width, bounds)
    return "\n".join(out)


def _scale(members: list[Span]) -> tuple[int, int]:
    """The time the bars cover: the whole trace, or - when its roots last far longer
    than the spans under them (the agent's own span lasts as long as the agent) - just
    the spans under them, so they are not squashed into a column."""
    start = min(s.start_ns for s in members)
    end = max(max(s.end_ns for s in members), start + 1)
    roots = {s.span_id for s in _roots(members)}
    inner = [s for s in members if s.span_id not in roots]
    if not inner:
        return start, end
    inner_start = min(s.start_ns for s in inner)
    inner_end = max(max(s.end_ns for s in inner), inner_start + 1)
    if end - start <= 2 * (inner_end - inner_start):
        return start, end
    return inner_start, inner_end


def _trace_lines(members: list[Span], width: int, bounds: tuple[int, int] | None) -> list[str]:
    first = min(s.start_ns for s in members)
    total = max(s.end_ns for s in members) - first
    lines = [f"trace {members[0].trace_id}  {total / 1e6:.3f} ms, {len(members)} span(s)"]
    low, high = bounds or _scale(members)
    if (low, high) != (first, first + total):
        lines[0] += f"; bars: {(low - first) / 1e6:.3f} to {(high - first) / 1e6:.3f} ms"
    by_id = {s.span_id: s for s in members}
    several_services = len({s.service for s in members}) > 1
    children: dict[str, list[Span]] = defaultdict(list)
    for span in members:
        children[span.parent_id if span.parent_id in by_id else ""].append(span)

    def walk(parent: str, depth: int) -> None:
        for span in sorted(children[parent], key=lambda s: s.start_ns):
            ids_text = " ".join(
                f"{k}={v}"
                for k, v in span.attributes.items()
                if k in ("container_id", "exec_id", "sandbox_id")
            )
            if span.failed:
                ids_text = f"ERROR {ids_text}".rstrip()
            above = by_id.get(span.parent_id)
            crossing = several_services and (above is None or above.service != span.service)
            label = f"{'  ' * depth}{f'[{span.service}] ' if crossing else ''}{span.name}"
            lines.append(
                f"  {label:<40.40} {span.duration_ms:10.3f} ms {span.kind:<8} "
                f"|{_bar(span, low, high, width)}| {ids_text}".rstrip()
            )
            walk(span.span_id, depth + 1)

    walk("", 0)
    return lines


def _bar(span: Span, low: int, high: int, width: int) -> str:
    scale = width / (high - low)
    left = (span.start_ns - low) * scale
    right = (span.end_ns - low) * scale
    if right < 0 or left > width:
        return " " * width  # outside the window
    cells = [" "] * width
    start = max(0, min(width - 1, int(left)))
    end = max(start + 1, min(width, int(right)))
    for n in range(start, end):
        cells[n] = "█"
    if left < 0:
        cells[0] = "<"
    if right > width:
        cells[-1] = ">"
    return "".join(cells)


# --- Chrome / Perfetto ------------------------------------------------------------------


def tracks(members: list[Span]) -> list[list[Span]]:
    """Spans on tracks where each one nests in the one before it that is still open -
    as the Trace Event Format draws a track - so overlapping spans that do not nest
    (concurrent calls) get tracks of their own. A span goes where its parent is if it can."""
    placed: list[list[Span]] = []
    open_: list[list[Span]] = []  # per track, the spans still open, innermost last
    track_of: dict[str, int] = {}
    for span in sorted(members, key=lambda s: (s.start_ns, -s.end_ns)):
        fits = []
        for n, stack in enumerate(open_):
            while stack and stack[-1].end_ns <= span.start_ns:
                stack.pop()
            if not stack or stack[-1].end_ns >= span.end_ns:
                fits.append(n)
        parent_track = track_of.get(span.parent_id)
        n = parent_track if parent_track in fits else (fits[0] if fits else len(open_))
        if n == len(open_):
            open_.append([])
            placed.append([])
        open_[n].append(span)
        placed[n].append(span)
        track_of[span.span_id] = n
    return placed


def chrome_trace(spans: list[Span]) -> dict[str, Any]:
    """The Trace Event Format: a complete ("X") event per span, on tracks (threads of
    process 1) where spans nest; each trace's tracks are named after it."""
    events: list[dict[str, Any]] = []
    tid = 0
    for members in traces(spans):
        for n, track in enumerate(tracks(members), 1):
            tid += 1
            events.append(
                {
                    "name": "thread_name",
                    "ph": "M",
                    "pid": 1,
                    "tid": tid,
                    "args": {"name": f"trace {members[0].trace_id[:8]} #{n}"},
                }
            )
            events += [
                {
                    "name": s.name,
                    "cat": s.kind or "span",
                    "ph": "X",
                    "pid": 1,
                    "tid": tid,
                    "ts": s.start_ns / 1000,
                    "dur": (s.end_ns - s.start_ns) / 1000,
                    "args": {
                        **s.attributes,
                        "service": s.service,
                        "kind": s.kind,
                        "trace_id": s.trace_id,
                        "span_id": s.span_id,
                        "parent_id": s.parent_id,
                    },
                }
                for s in track
            ]
    return {"traceEvents": events, "displayTimeUnit": "ms"}


# --- the command ------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kata-trace-view",
        description="Show spans (OTLP/JSON, as kata-trace-forwarder --output writes them) as "
        "a tree with a waterfall per trace, or write them for Perfetto.",
        epilog=EPILOG,
        formatter_class=Formatter,
    )
    p.add_argument("file", help="OTLP JSON ('-': stdin)")
    p.add_argument(
        "--chrome",
        metavar="OUT",
        help="write Chrome trace-event JSON to OUT instead (default: the waterfall)",
    )
    p.add_argument("--list", action="store_true", help="list the traces instead")
    p.add_argument(
        "--trace",
        metavar="ID",
        help="only the trace whose id starts with ID (default: every trace)",
    )
    p.add_argument(
        "--from",
        dest="start",
        type=offset,
        metavar="TIME",
        help="only spans running after TIME: seconds (or 250ms, 2s, 1m) after the first "
        "span shown began (default: from the first span)",
    )
    p.add_argument(
        "--to",
        dest="end",
        type=offset,
        metavar="TIME",
        help="only spans that began before TIME, as --from (default: to the last span)",
    )
    p.add_argument("--width", type=int, default=40, metavar="COLUMNS", help="waterfall width")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.width < 10:
        print("kata-trace-view: --width must be at least 10", file=sys.stderr)
        return 2
    try:
        spans = _load(args.file)
        if args.trace:
            spans = choose_trace(spans, args.trace)
        shown, bounds = window(spans, args.start, args.end)
    except ViewError as exc:
        print(f"kata-trace-view: {args.file}: {exc}", file=sys.stderr)
        return 1
    if args.list:
        print(listing(shown) if shown else "no spans")
        return 0
    if args.chrome:
        try:
            with open(args.chrome, "w", encoding="utf-8") as out:
                json.dump(chrome_trace(shown), out)
        except OSError as exc:
            print(f"kata-trace-view: cannot write {args.chrome}: {exc.strerror}", file=sys.stderr)
            return 1
        print(f"{len(shown)} span(s) written to {args.chrome}")
        return 0
    print(waterfall(shown, args.width, bounds) if shown else "no spans")
    return 0


def _load(path: str) -> list[Span]:
    try:
        if path == "-":
            return read_spans(sys.stdin.read())
        with open(path, encoding="utf-8") as f:
            return read_spans(f.read())
    except OSError as exc:
        raise ViewError(f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ViewError("not a text file (OTLP JSON is text)") from None


if __name__ == "__main__":
    sys.exit(main())
