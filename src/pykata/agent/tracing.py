"""The agent's spans (opentelemetry-sdk), sent to kata-trace-forwarder as OTLP records.

A root span covers the agent's run; each RPC gets a span named after its
method, whose parent is the W3C `traceparent` the runtime put in the ttRPC
metadata (else the root span); runtime invocations and mounts are children.

Export: the SDK batches spans; each batch becomes one OTLP
ExportTraceServiceRequest in an 8-byte length-prefixed record on a stream
to the forwarder. An absent forwarder costs one log line: records wait in a
bounded buffer (oldest dropped when full, counted and logged), the
connection is retried on every batch, and shutdown flushes everything -
the root span included.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .. import __version__, transport
from ..otlp import encode_record
from ..ttrpc import ServerContext

log = logging.getLogger("pykata.agent.tracing")

tracer = trace.get_tracer("pykata.agent")
_propagator = TraceContextTextMapPropagator()
ID_FIELDS = ("container_id", "exec_id", "sandbox_id")


class ForwarderExporter(SpanExporter):
    """Writes span batches as OTLP records to the forwarder, buffering while it is away."""

    def __init__(self, address: str, max_buffered_spans: int = 16384) -> None:
        self.address = address
        self.max_buffered_spans = max_buffered_spans
        self.dropped_spans = 0
        self._buffer: collections.deque[tuple[bytes, int]] = collections.deque()
        self._buffered_spans = 0
        self._sock: socket.socket | None = None
        self._reported_absent = False
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        record = encode_record(encode_spans(spans).SerializeToString())
        with self._lock:
            self._buffer.append((record, len(spans)))
            self._buffered_spans += len(spans)
            while self._buffered_spans > self.max_buffered_spans and len(self._buffer) > 1:
                _, count = self._buffer.popleft()
                self._buffered_spans -= count
                self.dropped_spans += count
                log.warning(
                    "span buffer full: dropped %d span(s), %d in all", count, self.dropped_spans
                )
            self._flush()
        return SpanExportResult.SUCCESS

    def _flush(self) -> bool:
        """Send what is buffered; False if the forwarder cannot be reached now."""
        while self._buffer:
            if self._sock is None:
                try:
                    self._sock = transport.connect_blocking(self.address, timeout=1.0)
                except transport.TransportError as exc:
                    if not self._reported_absent:
                        log.warning(
                            "trace forwarder unreachable (%s): spans are kept and "
                            "sent when it appears",
                            exc,
                        )
                        self._reported_absent = True
                    return False
                if self._reported_absent:
                    log.info("trace forwarder reached", extra={"address": self.address})
                    self._reported_absent = False
            record, count = self._buffer[0]
            try:
                self._sock.sendall(record)
            except OSError:
                self._sock.close()
                self._sock = None
                continue  # reconnect and send this record again
            self._buffer.popleft()
            self._buffered_spans -= count
        return True

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        deadline = time.monotonic() + timeout_millis / 1000
        while True:
            with self._lock:
                if self._flush():
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def shutdown(self) -> None:
        if not self.force_flush(5000):
            log.error(
                "trace forwarder unreachable at shutdown: %d span(s) lost", self._buffered_spans
            )
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class Tracing:
    """Tracing for one agent run: the provider, the root span, the RPC hook."""

    def __init__(self, address: str) -> None:
        self.exporter = ForwarderExporter(address)
        self.provider = TracerProvider(
            resource=Resource.create(
                {
                    "service.name": "kata-agent",
                    "service.version": __version__,
                    "process.pid": os.getpid(),
                }
            )
        )
        self.provider.add_span_processor(
            BatchSpanProcessor(
                self.exporter,
                max_queue_size=16384,
                max_export_batch_size=512,
                schedule_delay_millis=200,
            )
        )
        trace.set_tracer_provider(self.provider)
        self.root = tracer.start_span("kata-agent")
        self._root_context = trace.set_span_in_context(self.root)

    @contextlib.contextmanager
    def rpc_span(self, ctx: ServerContext, request: Any) -> Iterator[None]:
        """The span of one RPC: named after the method, child of the caller's traceparent."""
        carrier = {key: values[0] for key, values in ctx.metadata.items() if values}
        parent = _propagator.extract(carrier) if "traceparent" in carrier else self._root_context
        attributes = {"rpc.service": ctx.service, "rpc.method": ctx.method}
        for name in ID_FIELDS:
            value = getattr(request, name, "")
            if value:
                attributes[name] = value
        with tracer.start_as_current_span(ctx.method, context=parent, attributes=attributes):
            yield

    def stop(self) -> None:
        self.root.end()
        self.provider.shutdown()  # flushes every span, the root span included
