"""Lean spans for the agent and kata-agent-ctl (sans-IO: spanexport sends them).

The OpenTelemetry SDK costs more per span than a whole Check call (see
BENCHMARKS.md). Here a span costs its caller little: a small object, an id
from `random.getrandbits`, the caller's W3C traceparent kept as the header
text, and at its end one call to its tracer's sink (spanexport.Exporter,
which appends it to a queue). The parsing of the traceparents and the OTLP
encoding (`Span.encode`) are left to the export thread.

Attribute values (and status messages) are cut to 4096 characters when
recorded.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from . import otlp

_random = random.Random()


@dataclass(frozen=True, slots=True)
class Limits:
    #: Characters kept of an attribute value or status message.
    max_attribute_length: int = 4096
    #: Ended spans waiting for the export thread.
    max_pending_spans: int = 4096
    #: Encoded spans waiting for the forwarder.
    max_buffered_bytes: int = 8 << 20
    #: The largest record sent (spans are packed up to it).
    max_record_bytes: int = 1 << 20
    #: Seconds between exports.
    interval: float = 0.2
    #: Seconds a connect or a send may take before it is abandoned.
    io_timeout: float = 2.0


class SpanContext(NamedTuple):
    """What a span's children and callees need to know of it."""

    trace_id: bytes
    span_id: bytes
    flags: int = 1
    remote: bool = False
    trace_state: str = ""

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)

    def traceparent(self) -> str:
        return f"00-{self.trace_id.hex()}-{self.span_id.hex()}-{self.flags:02x}"


#: version-trace_id-parent_id-flags; a later version may add fields after a dash.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


def parse_traceparent(value: str, tracestate: str = "") -> SpanContext | None:
    """A W3C traceparent header; None when it is not one (the W3C rules: ignore it then)."""
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace, span, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace == _ZERO_TRACE or span == _ZERO_SPAN:
        return None
    return SpanContext(
        bytes.fromhex(trace), bytes.fromhex(span), int(flags, 16), True, tracestate[:512]
    )


class RemoteParent(NamedTuple):
    """A caller's traceparent and tracestate headers, parsed only when needed; `fallback`
    is the parent when the header is no valid traceparent."""

    traceparent: str
    tracestate: str
    fallback: SpanContext


def _bounded(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[:limit]


class Span:
    """A span being recorded; end() hands it to the export thread."""

    __slots__ = (
        "_tracer",
        "attributes",
        "encoded_attributes",
        "end_time",
        "events",
        "kind",
        "name",
        "parent",
        "span_id",
        "start",
        "status",
        "status_message",
    )

    def __init__(
        self,
        tracer: Tracer,
        name: str,
        parent: SpanContext | RemoteParent | None,
        kind: int,
        attributes: dict[str, otlp.AttributeValue],
        start: int,
        encoded_attributes: bytes = b"",
    ) -> None:
        self._tracer = tracer
        self.name = name
        self.span_id = _random.getrandbits(64).to_bytes(8, "big")
        if parent is None:  # the root of a new trace
            parent = SpanContext(_random.getrandbits(128).to_bytes(16, "big"), b"")
        self.parent = parent
        self.kind = kind
        self.attributes = attributes
        self.encoded_attributes = encoded_attributes
        self.start = start
        self.end_time = 0
        self.events: list[otlp.Event] = []
        self.status = 0
        self.status_message = ""

    def parent_context(self) -> SpanContext:
        """The parent (trace id, flags, trace state); span_id b"" for a trace's root."""
        parent = self.parent
        if isinstance(parent, RemoteParent):
            parent = self.parent = (
                parse_traceparent(parent.traceparent, parent.tracestate) or parent.fallback
            )
        return parent

    @property
    def context(self) -> SpanContext:
        parent = self.parent_context()
        return SpanContext(parent.trace_id, self.span_id, parent.flags, False, parent.trace_state)

    def set_attribute(self, key: str, value: otlp.AttributeValue) -> None:
        limit = self._tracer.limits.max_attribute_length
        self.attributes[key] = _bounded(value, limit) if isinstance(value, str) else value

    def record_error(self, error: BaseException, when: int | None = None) -> None:
        """Status ERROR with the error's text, and an `exception` event (semantic conventions)."""
        limit = self._tracer.limits.max_attribute_length
        when = when or time.time_ns()
        message = _bounded(str(error), limit)
        self.status = otlp.STATUS_ERROR
        self.status_message = _bounded(f"{type(error).__name__}: {message}", limit)
        attributes = {"exception.type": type(error).__name__, "exception.message": message}
        self.events.append(otlp.Event("exception", when, attributes))

    def end(self, end: int | None = None) -> None:
        self.end_time = end or time.time_ns()
        exporter = self._tracer.exporter
        if exporter is not None:
            exporter.add(self)

    def encode(self) -> bytes | None:
        """The OTLP Span message; None when its trace is not sampled."""
        parent = self.parent_context()
        if not parent.flags & 1:
            return None
        flags = parent.flags | otlp.FLAG_HAS_IS_REMOTE
        if parent.remote:
            flags |= otlp.FLAG_IS_REMOTE
        return otlp.encode_span(
            trace_id=parent.trace_id,
            span_id=self.span_id,
            parent_id=parent.span_id,
            name=self.name,
            kind=self.kind,
            start=self.start,
            end=self.end_time,
            attributes=self.attributes,
            encoded_attributes=self.encoded_attributes,
            flags=flags,
            trace_state=parent.trace_state,
            events=self.events,
            status=self.status,
            status_message=self.status_message,
            max_length=self._tracer.limits.max_attribute_length,
        )


class Sink(Protocol):
    """Where a tracer's ended spans go (spanexport.Exporter)."""

    limits: Limits

    def add(self, span: Span) -> None:
        """An ended span: cheap, called on the caller's path."""

    @property
    def exported_spans(self) -> int: ...

    @property
    def dropped_spans(self) -> int: ...


class Tracer:
    """Starts spans; ended ones go to the exporter (or nowhere: None)."""

    def __init__(self, exporter: Sink | None, limits: Limits | None = None) -> None:
        self.exporter = exporter
        self.limits = limits or (exporter.limits if exporter is not None else Limits())

    def start(
        self,
        name: str,
        parent: SpanContext | RemoteParent | None = None,
        *,
        kind: int = otlp.INTERNAL,
        attributes: Mapping[str, otlp.AttributeValue] | None = None,
        start: int | None = None,
        encoded_attributes: bytes = b"",
    ) -> Span:
        """A span, child of `parent` (else the root of a new trace). `encoded_attributes`:
        attributes already encoded (otlp.encode_attributes), for ones that repeat."""
        limit = self.limits.max_attribute_length
        bounded = {
            key: _bounded(value, limit) if isinstance(value, str) else value
            for key, value in (attributes or {}).items()
        }
        return Span(self, name, parent, kind, bounded, start or time.time_ns(), encoded_attributes)
