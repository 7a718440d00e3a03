"""Lean spans for the agent and kata-agent-ctl, exported as OTLP records.

The OpenTelemetry SDK costs more per span than a whole Check call (see
BENCHMARKS.md), so spans here are small objects: ids from
`random.getrandbits`, the W3C traceparent parsed by hand, and a span is
encoded into OTLP protobuf once, when it ends (otlp.encode_span). A thread
sends the encoded spans to kata-trace-forwarder every 200 ms, packed into
records of at most 1 MiB.

Bounds: attribute values (and status messages) are cut to 4096 characters;
encoded spans wait in a buffer of at most 8 MiB (past it the oldest go,
counted and logged); a send that the forwarder does not take within 2
seconds is abandoned (the connection is dropped and the record sent again
on a new one); stop() returns within its timeout whatever the forwarder
does, counting what it could not send.
"""

from __future__ import annotations

import collections
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from . import otlp, transport, virtio_serial

log = logging.getLogger("pykata.spans")

_random = random.Random()


@dataclass(frozen=True, slots=True)
class Limits:
    #: Characters kept of an attribute value or status message.
    max_attribute_length: int = 4096
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


class Span:
    """A span being recorded; end() encodes it for export."""

    __slots__ = (
        "_tracer",
        "attributes",
        "context",
        "events",
        "kind",
        "name",
        "parent",
        "start",
        "status",
        "status_message",
    )

    def __init__(
        self,
        tracer: Tracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: int,
        attributes: dict[str, otlp.AttributeValue],
        start: int,
    ) -> None:
        self._tracer = tracer
        self.name = name
        self.context = context
        self.parent = parent
        self.kind = kind
        self.attributes = attributes
        self.start = start
        self.events: list[otlp.Event] = []
        self.status = 0
        self.status_message = ""

    def set_attribute(self, key: str, value: otlp.AttributeValue) -> None:
        self.attributes[key] = value

    def record_error(self, error: BaseException, when: int | None = None) -> None:
        """Status ERROR with the error's text, and an `exception` event (semantic conventions)."""
        when = when or time.time_ns()
        text = f"{type(error).__name__}: {error}"
        self.status, self.status_message = otlp.STATUS_ERROR, text
        attributes = {"exception.type": type(error).__name__, "exception.message": str(error)}
        self.events.append(otlp.Event("exception", when, attributes))

    def end(self, end: int | None = None) -> None:
        self._tracer.finish(self, end or time.time_ns())


class Tracer:
    """Starts spans; finished ones go, encoded, to the exporter (or nowhere: None)."""

    def __init__(self, exporter: Exporter | None, limits: Limits | None = None) -> None:
        self.exporter = exporter
        self.limits = limits or Limits()

    def start(
        self,
        name: str,
        parent: SpanContext | None = None,
        *,
        kind: int = otlp.INTERNAL,
        attributes: dict[str, otlp.AttributeValue] | None = None,
        start: int | None = None,
    ) -> Span:
        span_id = _random.getrandbits(64).to_bytes(8, "big")
        if parent is None:
            context = SpanContext(_random.getrandbits(128).to_bytes(16, "big"), span_id)
        else:
            context = SpanContext(parent.trace_id, span_id, parent.flags, False, parent.trace_state)
        return Span(self, name, context, parent, kind, attributes or {}, start or time.time_ns())

    def finish(self, span: Span, end: int) -> None:
        if self.exporter is None or not span.context.sampled:
            return
        parent = span.parent
        flags = span.context.flags | otlp.FLAG_HAS_IS_REMOTE
        if parent is not None and parent.remote:
            flags |= otlp.FLAG_IS_REMOTE
        self.exporter.add(
            otlp.encode_span(
                trace_id=span.context.trace_id,
                span_id=span.context.span_id,
                parent_id=parent.span_id if parent is not None else b"",
                name=span.name,
                kind=span.kind,
                start=span.start,
                end=end,
                attributes=span.attributes,
                flags=flags,
                trace_state=span.context.trace_state,
                events=span.events,
                status=span.status,
                status_message=span.status_message,
                max_length=self.limits.max_attribute_length,
            )
        )


Connection = socket.socket | virtio_serial.PortWriter


def _connect(address: str, timeout: float) -> Connection:
    parsed = transport.as_address(address)
    if isinstance(parsed, transport.SerialAddress):
        return virtio_serial.PortWriter(parsed, timeout=timeout)
    return transport.connect_blocking(parsed, timeout=timeout)


class Exporter:
    """Sends encoded spans to kata-trace-forwarder from a thread, in OTLP records."""

    def __init__(
        self,
        address: str,
        resource: Mapping[str, otlp.AttributeValue],
        scope: str,
        scope_version: str = "",
        limits: Limits | None = None,
    ) -> None:
        self.address = address
        self.limits = limits or Limits()
        self._resource, self._scope = otlp.encode_resource_scope(resource, scope, scope_version)
        self._spans: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._pending: tuple[bytes, int] | None = None  # a record being sent, and its spans
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop_at: float | None = None
        self._connection: Connection | None = None
        self._reported_absent = False
        self._reported_failing = False
        self._last_drop_log = 0.0
        self._unlogged_drops = 0
        self.exported_spans = 0
        self.dropped_spans = 0
        self._thread = threading.Thread(target=self._run, name="span-export", daemon=True)
        self._thread.start()

    # --- the callers' side ---------------------------------------------------------

    def add(self, span: bytes) -> None:
        with self._lock:
            self._spans.append(span)
            self._buffered += len(span)
            if self._buffered > self.limits.max_buffered_bytes:
                self._drop_oldest()
            if self._buffered >= self.limits.max_record_bytes:
                self._wake.set()  # a full record's worth: no need to wait for the interval

    def _drop_oldest(self) -> None:
        dropped = 0
        while self._buffered > self.limits.max_buffered_bytes and self._spans:
            self._buffered -= len(self._spans.popleft())
            dropped += 1
        self._count_dropped(dropped, "span buffer full")

    def _count_dropped(self, count: int, why: str) -> None:
        """Dropped spans: counted, and logged at most once a second with the total."""
        self.dropped_spans += count
        self._unlogged_drops += count
        now = time.monotonic()
        if self._unlogged_drops and now - self._last_drop_log >= 1.0:
            log.warning(
                "%s: dropped %d span(s), %d in all", why, self._unlogged_drops, self.dropped_spans
            )
            self._last_drop_log = now
            self._unlogged_drops = 0

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is left, for up to `timeout` seconds, then close; what is left is lost."""
        self._stop_at = time.monotonic() + timeout
        self._wake.set()
        self._thread.join(timeout + self.limits.io_timeout)
        with self._lock:
            lost = len(self._spans) + (self._pending[1] if self._pending else 0)
            if lost:
                self.dropped_spans += lost
                log.error(
                    "trace forwarder at %s did not take %d span(s) before shutdown; "
                    "%d dropped in all",
                    self.address,
                    lost,
                    self.dropped_spans,
                )
            self._spans.clear()
            self._pending = None

    # --- the export thread -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            stopping = self._stop_at is not None
            if not stopping:
                self._wake.wait(self.limits.interval)
                self._wake.clear()
            if self._pending is None:
                self._pending = self._next_record()
            if self._pending is None:
                if stopping:
                    break
                continue
            if self._send(self._pending[0]):
                self.exported_spans += self._pending[1]
                self._pending = None
            elif stopping and self._remaining() <= 0:
                break
            elif stopping:
                time.sleep(min(0.05, self._remaining()))
        if self._connection is not None:
            self._connection.close()

    def _remaining(self) -> float:
        return self.limits.io_timeout if self._stop_at is None else self._stop_at - time.monotonic()

    def _next_record(self) -> tuple[bytes, int] | None:
        """Buffered spans packed into one record (a span too large for any is dropped)."""
        limit = self.limits.max_record_bytes
        batch: list[bytes] = []
        size = 0
        with self._lock:
            while self._spans and size + len(self._spans[0]) + 16 <= limit:
                span = self._spans.popleft()
                batch.append(span)
                size += len(span) + 16  # the field's tag and length
            while not batch and self._spans:
                span = self._spans.popleft()
                self._buffered -= len(span)
                self._count_dropped(1, f"a span of {len(span)} bytes exceeds the record limit")
            self._buffered -= size - 16 * len(batch)
        if not batch:
            return None
        payload = otlp.encode_request(self._resource, self._scope, batch)
        return otlp.encode_record(payload), len(batch)

    def _send(self, record: bytes) -> bool:
        timeout = max(0.0, min(self.limits.io_timeout, self._remaining()))
        if timeout == 0.0:
            return False
        if self._connection is None:
            try:
                self._connection = _connect(self.address, timeout)
            except (transport.TransportError, OSError) as exc:
                if not self._reported_absent:
                    log.warning(
                        "trace forwarder unreachable (%s): spans are kept (up to %d bytes) "
                        "and sent when it appears",
                        exc,
                        self.limits.max_buffered_bytes,
                    )
                    self._reported_absent = True
                return False
            if self._reported_absent:
                log.info("trace forwarder reached", extra={"address": self.address})
                self._reported_absent = False
        connection = self._connection
        try:
            if isinstance(connection, socket.socket):
                connection.settimeout(timeout)
            else:
                connection.timeout = timeout
            connection.sendall(record)
        except OSError as exc:
            # Part of the record may be out: the forwarder drops that one when the
            # connection ends, and it goes again, whole, on the next connection.
            if not self._reported_failing:
                log.warning(
                    "the trace forwarder does not take spans (%s); reconnecting, "
                    "spans are kept meanwhile",
                    exc or type(exc).__name__,
                )
                self._reported_failing = True
            connection.close()
            self._connection = None
            return False
        self._reported_failing = False
        return True
