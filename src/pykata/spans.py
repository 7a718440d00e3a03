"""Lean spans for the agent and kata-agent-ctl, exported as OTLP records.

The OpenTelemetry SDK costs more per span than a whole Check call (see
BENCHMARKS.md). Here a span costs its caller little: a small object, an id
from `random.getrandbits`, the caller's W3C traceparent kept as the header
text, and at its end one append to a queue. The export thread does the rest
in batches every 200 ms: it parses the traceparents, encodes the spans into
OTLP protobuf (otlp.encode_span) and sends them to kata-trace-forwarder in
records of at most 1 MiB.

Bounds: attribute values (and status messages) are cut to 4096 characters
when recorded; at most 4096 ended spans wait for the export thread, and
encoded spans wait in a buffer of at most 8 MiB (past either the oldest go,
counted and logged); a connect or send the forwarder does not take within 2
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


class Tracer:
    """Starts spans; ended ones go to the exporter (or nowhere: None)."""

    def __init__(self, exporter: Exporter | None, limits: Limits | None = None) -> None:
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


Connection = socket.socket | virtio_serial.PortWriter


def _connect(address: str, timeout: float) -> Connection:
    parsed = transport.as_address(address)
    if isinstance(parsed, transport.SerialAddress):
        return virtio_serial.PortWriter(parsed, timeout=timeout)
    return transport.connect_blocking(parsed, timeout=timeout)


class Exporter:
    """Encodes ended spans and sends them to kata-trace-forwarder from a thread."""

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
        self._ended: collections.deque[Span] = collections.deque()  # appended by callers only
        self._dropped_ended = 0  # counted by callers only
        self._spans: collections.deque[bytes] = collections.deque()  # encoded, by the thread
        self._buffered = 0
        self._pending: tuple[bytes, int] | None = None  # a record being sent, and its spans
        self._dropped_encoded = 0
        self._wake = threading.Event()
        self._stop_at: float | None = None
        self._connection: Connection | None = None
        self._reported_absent = False
        self._reported_failing = False
        self._last_drop_log = 0.0
        self._logged_drops = 0
        self.exported_spans = 0
        self._thread = threading.Thread(target=self._run, name="span-export", daemon=True)
        self._thread.start()

    @property
    def dropped_spans(self) -> int:
        return self._dropped_ended + self._dropped_encoded

    # --- the callers' side ---------------------------------------------------------

    def add(self, span: Span) -> None:
        """An ended span (cheap: the export thread encodes it)."""
        ended = self._ended
        ended.append(span)
        if len(ended) == self.limits.max_pending_spans // 2:
            self._wake.set()  # busy: no need to wait for the interval
        elif len(ended) > self.limits.max_pending_spans:
            try:
                ended.popleft()  # the export thread is stuck: the oldest go
                self._dropped_ended += 1
            except IndexError:
                pass

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is left, for up to `timeout` seconds, then close; what is left is lost."""
        self._stop_at = time.monotonic() + timeout
        self._wake.set()
        self._thread.join(timeout + self.limits.io_timeout)
        lost = len(self._ended) + len(self._spans) + (self._pending[1] if self._pending else 0)
        if lost:
            self._dropped_encoded += lost
            log.error(
                "trace forwarder at %s did not take %d span(s) before shutdown; %d dropped in all",
                self.address,
                lost,
                self.dropped_spans,
            )
        self._ended.clear()
        self._spans.clear()
        self._pending = None

    # --- the export thread -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            stopping = self._stop_at is not None
            if not stopping:
                self._wake.wait(self.limits.interval)
                self._wake.clear()
            self._encode_ended()
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

    def _encode_ended(self) -> None:
        """Ended spans into the encoded buffer, which keeps the newest max_buffered_bytes."""
        ended, spans = self._ended, self._spans
        while ended:
            encoded = ended.popleft().encode()
            if encoded is not None:
                spans.append(encoded)
                self._buffered += len(encoded)
        dropped = 0
        while self._buffered > self.limits.max_buffered_bytes and spans:
            self._buffered -= len(spans.popleft())
            dropped += 1
        self._dropped_encoded += dropped
        self._log_drops()

    def _log_drops(self) -> None:
        """Dropped spans are logged at most once a second, with the total."""
        total = self.dropped_spans
        now = time.monotonic()
        if total > self._logged_drops and now - self._last_drop_log >= 1.0:
            log.warning(
                "span buffer full: dropped %d span(s), %d in all",
                total - self._logged_drops,
                total,
            )
            self._last_drop_log = now
            self._logged_drops = total

    def _remaining(self) -> float:
        return self.limits.io_timeout if self._stop_at is None else self._stop_at - time.monotonic()

    def _next_record(self) -> tuple[bytes, int] | None:
        """Encoded spans packed into one record (a span too large for any is dropped)."""
        limit = self.limits.max_record_bytes
        spans = self._spans
        batch: list[bytes] = []
        size = 0
        while spans and size + len(spans[0]) + 16 <= limit:
            span = spans.popleft()
            batch.append(span)
            size += len(span) + 16  # the field's tag and length
        self._buffered -= size - 16 * len(batch)
        while not batch and spans:
            span = spans.popleft()
            self._buffered -= len(span)
            self._dropped_encoded += 1
            log.warning("a span of %d bytes exceeds the record limit: dropped", len(span))
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
