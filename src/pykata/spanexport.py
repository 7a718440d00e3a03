"""Spans to kata-trace-forwarder: the export thread, its buffers and its connection.

Callers hand ended spans over with one append to a queue (`Exporter.add`).
The export thread does the rest in batches every 200 ms: it encodes the
spans into OTLP protobuf (`Span.encode`, which parses the traceparents) and
sends them to kata-trace-forwarder in records of at most 1 MiB
(otlp.encode_record).

Bounds: at most 4096 ended spans wait for the export thread, and encoded
spans wait in a buffer of at most 8 MiB (past either the oldest go, counted
and logged); a connect or send the forwarder does not take within 2 seconds
is abandoned (the connection is dropped and the record sent again on a new
one); stop() returns within its timeout whatever the forwarder does,
counting what it could not send.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from collections.abc import Mapping

from . import otlp, transport
from .spans import Limits, Span
from .transport.serial import PortWriter

# The name these log lines have always had.
log = logging.getLogger("pykata.spans")


Connection = socket.socket | PortWriter


def _connect(address: str, timeout: float) -> Connection:
    parsed = transport.as_address(address)
    if isinstance(parsed, transport.SerialAddress):
        return PortWriter(parsed, timeout=timeout)
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
