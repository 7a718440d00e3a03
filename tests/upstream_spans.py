"""Records as upstream's Rust agent writes them, built by hand for the tests.

Upstream's vsock exporter (kata-containers src/agent/vsock-exporter) frames
`serde_json::to_vec(&SpanData)` of opentelemetry-rust 0.17 (features
`serialize`). These helpers write the shapes serde derives for those types
(see pykata.forwarder.upstream's docstring) from plain Python values, and
the same span as the OTLP protobuf the forwarder must turn it into, so a
test can compare the two field by field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from pykata.otlp import encode_record

Value = bool | int | float | str | list[bool] | list[int] | list[float] | list[str] | None


def system_time(ns: int) -> dict[str, int]:
    return {"secs_since_epoch": ns // 1_000_000_000, "nanos_since_epoch": ns % 1_000_000_000}


def serde_value(value: Value) -> dict[str, Any]:
    """opentelemetry::Value as serde writes it; None is an F64 NaN (serde_json: null)."""
    if isinstance(value, list):
        return {"Array": {_kind(next((v for v in value if v is not None), None)): value}}
    return {_kind(value): value}


def _kind(value: Value) -> str:
    if value is None or isinstance(value, float):
        return "F64"
    if isinstance(value, bool):
        return "Bool"
    if isinstance(value, int):
        return "I64"
    return "String"


def otlp_value(value: Value) -> AnyValue:
    if isinstance(value, list):
        return AnyValue(array_value=ArrayValue(values=[otlp_value(v) for v in value]))
    if value is None:
        return AnyValue(double_value=math.nan)
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    return AnyValue(string_value=value)


def otlp_attributes(attributes: dict[str, Value]) -> list[KeyValue]:
    return [KeyValue(key=k, value=otlp_value(v)) for k, v in attributes.items()]


def span_context(trace_id: int, span_id: int, *, flags: int = 1, remote: bool = False,
                 state: list[tuple[str, str]] | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "trace_id": trace_id,
        "span_id": span_id,
        "trace_flags": flags,
        "is_remote": remote,
        "trace_state": [list(pair) for pair in state] if state is not None else None,
    }


@dataclass
class Event:
    name: str
    time: int
    attributes: dict[str, Value] = field(default_factory=dict)
    dropped: int = 0


@dataclass
class Link:
    trace_id: int
    span_id: int
    remote: bool
    attributes: dict[str, Value] = field(default_factory=dict)
    flags: int = 1
    state: list[tuple[str, str]] | None = None


@dataclass
class UpstreamSpan:
    """One span as upstream's agent records it; .record() and .otlp() are its two forms."""

    name: str
    trace_id: int
    span_id: int
    parent_id: int = 0
    kind: str = "Internal"
    start: int = 1_700_000_000_123_456_789
    end: int = 1_700_000_000_223_456_789
    attributes: dict[str, Value] = field(default_factory=dict)
    dropped_attributes: int = 0
    events: list[Event] = field(default_factory=list)
    dropped_events: int = 0
    links: list[Link] = field(default_factory=list)
    dropped_links: int = 0
    status: str = "Unset"
    status_message: str = ""
    flags: int = 1
    state: list[tuple[str, str]] | None = None
    resource: dict[str, Value] | None = field(
        default_factory=lambda: {"service.name": "unknown_service"}
    )

    def serde(self) -> dict[str, Any]:
        keys = list(self.attributes)
        return {
            "span_context": span_context(
                self.trace_id, self.span_id, flags=self.flags, state=self.state
            ),
            "parent_span_id": self.parent_id,
            "span_kind": self.kind,
            "name": self.name,
            "start_time": system_time(self.start),
            "end_time": system_time(self.end),
            # a HashMap: serde writes it in its own order; evict_list is newest first
            "attributes": {
                "map": {k: serde_value(self.attributes[k]) for k in sorted(keys, reverse=True)},
                "evict_list": list(reversed(keys)),
                "max_len": 128,
                "dropped_count": self.dropped_attributes,
            },
            "events": {
                "queue": [
                    {
                        "name": e.name,
                        "timestamp": system_time(e.time),
                        "attributes": [
                            {"key": k, "value": serde_value(v)} for k, v in e.attributes.items()
                        ],
                        "dropped_attributes_count": e.dropped,
                    }
                    for e in self.events
                ]
                or None,
                "max_len": 128,
                "dropped_count": self.dropped_events,
            },
            "links": {
                "queue": [
                    {
                        "span_context": span_context(
                            link.trace_id,
                            link.span_id,
                            flags=link.flags,
                            remote=link.remote,
                            state=link.state,
                        ),
                        "attributes": [
                            {"key": k, "value": serde_value(v)} for k, v in link.attributes.items()
                        ],
                        "dropped_attributes_count": 0,
                    }
                    for link in self.links
                ]
                or None,
                "max_len": 128,
                "dropped_count": self.dropped_links,
            },
            "status_code": self.status,
            "status_message": self.status_message,
            "resource": None
            if self.resource is None
            else {"attrs": {k: serde_value(v) for k, v in sorted(self.resource.items())}},
        }

    def record(self) -> bytes:
        """The record on the wire: 8-byte length, then serde_json's compact output."""
        return encode_record(json.dumps(self.serde(), separators=(",", ":")).encode())

    def otlp(self) -> Span:
        """The span the forwarder must export for it."""
        span = Span(
            trace_id=self.trace_id.to_bytes(16, "big"),
            span_id=self.span_id.to_bytes(8, "big"),
            trace_state=",".join(f"{k}={v}" for k, v in self.state or []),
            parent_span_id=self.parent_id.to_bytes(8, "big") if self.parent_id else b"",
            flags=self.flags,
            name=self.name,
            kind={"Internal": 1, "Server": 2, "Client": 3, "Producer": 4, "Consumer": 5}[self.kind],
            start_time_unix_nano=self.start,
            end_time_unix_nano=self.end,
            attributes=otlp_attributes(self.attributes),
            dropped_attributes_count=self.dropped_attributes,
            events=[
                Span.Event(
                    time_unix_nano=e.time,
                    name=e.name,
                    attributes=otlp_attributes(e.attributes),
                    dropped_attributes_count=e.dropped,
                )
                for e in self.events
            ],
            dropped_events_count=self.dropped_events,
            links=[
                Span.Link(
                    trace_id=link.trace_id.to_bytes(16, "big"),
                    span_id=link.span_id.to_bytes(8, "big"),
                    trace_state=",".join(f"{k}={v}" for k, v in link.state or []),
                    attributes=otlp_attributes(link.attributes),
                    flags=link.flags | 0x100 | (0x200 if link.remote else 0),
                )
                for link in self.links
            ],
            dropped_links_count=self.dropped_links,
            status=Status(
                code={"Unset": 0, "Ok": 1, "Error": 2}[self.status],  # type: ignore[arg-type]
                message=self.status_message,
            ),
        )
        return span


TRACE = 0x0AF7651916CD43DD8448EB211C80319C
SHIM_SPAN = 0xB7AD6B7169203331  # the runtime's span: the remote parent


def create_container_trace() -> list[UpstreamSpan]:
    """Spans as the agent records a CreateContainer: nested three deep, every
    attribute type, events, a link, an error status, dropped counts."""
    rpc = UpstreamSpan(
        name="create_container",
        trace_id=TRACE,
        span_id=0x1111111111111111,
        parent_id=SHIM_SPAN,
        kind="Server",
        state=[("kata", "t61rcWkgMzE"), ("congo", "ucfJifl5GOE")],
        attributes={
            "mod": "rpc.rs",
            "req": 'CreateContainerRequest { container_id: "c1", exec_id: "c1", .. }',
            "code.filepath": "src/rpc.rs",
            "code.lineno": 949,
            "busy_ns": 812_345,
            "idle_ns": -1,
            "ratio": 0.25,
            "unbounded": None,
            "traced": True,
            "flags": [True, False],
            "counts": [1, -2, 9_007_199_254_740_993],
            "weights": [1.5, None],
            "names": ["c1", "snapshot ü"],
        },
        dropped_attributes=2,
        resource={
            "service.name": "unknown_service",
            "telemetry.sdk.language": "rust",
            "telemetry.sdk.name": "opentelemetry",
            "telemetry.sdk.version": "0.17.0",
        },
    )
    child = UpstreamSpan(
        name="do_create_container",
        trace_id=TRACE,
        span_id=0x2222222222222222,
        parent_id=rpc.span_id,
        start=rpc.start + 1000,
        end=rpc.end - 1000,
        attributes={"container_id": "c1"},
        events=[
            Event(
                "new process",
                rpc.start + 5000,
                {"level": "INFO", "target": "rustjail", "pid": 4242, "ok": True, "load": 0.5},
                dropped=1,
            )
        ],
        dropped_events=3,
        links=[
            Link(0xFEEDFACEFEEDFACEFEEDFACEFEEDFACE, 0x3333333333333333, True, {"why": "sandbox"}),
            Link(TRACE, 0x4444444444444444, False, state=[("a", "1")], flags=0),
        ],
        dropped_links=1,
        state=rpc.state,
        resource=rpc.resource,
    )
    failed = UpstreamSpan(
        name="setup_bundle",
        trace_id=TRACE,
        span_id=0x5555555555555555,
        parent_id=child.span_id,
        start=child.start + 10,
        end=child.start + 20,
        status="Error",
        status_message="open /run/kata-containers/c1/config.json: no such file",
        events=[Event("exception", child.start + 15, {"exception.message": "ENOENT"})],
        state=rpc.state,
        resource=rpc.resource,
    )
    return [rpc, child, failed]
