"""kata-trace-view: look at spans - a waterfall in the terminal, or Chrome trace JSON.

    kata-trace-view spans.jsonl                  # the span tree with durations, per trace
    kata-trace-view spans.jsonl --chrome out.json   # for Perfetto / chrome://tracing

Reads OTLP/JSON lines, as `kata-trace-forwarder --output FILE` writes them
(also the base64-id files of its older versions). A trace may span several
services (kata-agent-ctl --trace, the agent): a span whose service differs
from its parent's shows the service's name in brackets.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from . import otlpjson


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

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def read_spans(lines: Iterable[str]) -> list[Span]:
    spans = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            request = otlpjson.loads(line)
        except ValueError as exc:
            raise ValueError(f"line {number} is not an OTLP JSON request: {exc}") from None
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
                        )
                    )
    return spans


def waterfall(spans: list[Span], width: int = 40) -> str:
    """Each trace as a tree, with a bar showing when each span ran."""
    by_trace: dict[str, list[Span]] = defaultdict(list)
    for span in spans:
        by_trace[span.trace_id].append(span)
    out: list[str] = []
    for members in sorted(by_trace.values(), key=lambda m: min(s.start_ns for s in m)):
        out += _trace_lines(members, width)
    return "\n".join(out)


def _trace_lines(members: list[Span], width: int) -> list[str]:
    start = min(s.start_ns for s in members)
    total = max(max(s.end_ns for s in members) - start, 1)
    lines = [f"trace {members[0].trace_id}  {total / 1e6:.3f} ms, {len(members)} span(s)"]
    by_id = {s.span_id: s for s in members}
    several_services = len({s.service for s in members}) > 1
    children: dict[str, list[Span]] = defaultdict(list)
    for span in members:
        children[span.parent_id if span.parent_id in by_id else ""].append(span)

    def walk(parent: str, depth: int) -> None:
        for span in sorted(children[parent], key=lambda s: s.start_ns):
            left = int((span.start_ns - start) / total * width)
            length = max(1, int((span.end_ns - span.start_ns) / total * width))
            bar = " " * left + "█" * min(length, width - left)
            ids_text = " ".join(
                f"{k}={v}"
                for k, v in span.attributes.items()
                if k in ("container_id", "exec_id", "sandbox_id")
            )
            above = by_id.get(span.parent_id)
            crossing = several_services and (above is None or above.service != span.service)
            label = f"{'  ' * depth}{f'[{span.service}] ' if crossing else ''}{span.name}"
            lines.append(
                f"  {label:<40.40} {span.duration_ms:10.3f} ms |{bar:<{width}}| {ids_text}".rstrip()
            )
            walk(span.span_id, depth + 1)

    walk("", 0)
    return lines


def chrome_trace(spans: list[Span]) -> dict[str, Any]:
    """The Trace Event Format: one complete ("X") event per span, a row per trace."""
    rows = {t: n for n, t in enumerate(dict.fromkeys(s.trace_id for s in spans), 1)}
    events = [
        {
            "name": s.name,
            "cat": "kata",
            "ph": "X",
            "pid": 1,
            "tid": rows[s.trace_id],
            "ts": s.start_ns / 1000,
            "dur": (s.end_ns - s.start_ns) / 1000,
            "args": {**s.attributes, "span_id": s.span_id, "parent_id": s.parent_id},
        }
        for s in spans
    ]
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kata-trace-view",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", help="OTLP JSON lines ('-' for stdin)")
    parser.add_argument("--chrome", metavar="OUT", help="write Chrome trace-event JSON to OUT")
    parser.add_argument("--width", type=int, default=40, help="waterfall width")
    args = parser.parse_args(argv)
    try:
        with open(args.file, encoding="utf-8") if args.file != "-" else sys.stdin as f:
            spans = read_spans(f)
    except (OSError, ValueError) as exc:
        print(f"kata-trace-view: {exc}", file=sys.stderr)
        return 1
    if args.chrome:
        with open(args.chrome, "w", encoding="utf-8") as out:
            json.dump(chrome_trace(spans), out)
        print(f"{len(spans)} span(s) written to {args.chrome}")
        return 0
    print(waterfall(spans, args.width) if spans else "no spans")
    return 0


if __name__ == "__main__":
    sys.exit(main())
