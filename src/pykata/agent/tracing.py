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

import asyncio
import collections
import contextlib
import contextvars
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
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .. import __version__, transport, virtio_serial
from ..otlp import encode_record
from ..ttrpc import ServerContext

log = logging.getLogger("pykata.agent.tracing")

tracer = trace.get_tracer("pykata.agent")
_propagator = TraceContextTextMapPropagator()
ID_FIELDS = ("container_id", "exec_id", "sandbox_id")


def _open(address: str) -> socket.socket | virtio_serial.PortWriter:
    """A connection to the forwarder: a socket, or in a guest without vsock a serial port."""
    parsed = transport.as_address(address)
    if isinstance(parsed, transport.SerialAddress):
        return virtio_serial.PortWriter(parsed)
    return transport.connect_blocking(parsed, timeout=1.0)


class ForwarderExporter(SpanExporter):
    """Writes span batches as OTLP records to the forwarder, buffering while it is away."""

    def __init__(self, address: str, max_buffered_spans: int = 16384) -> None:
        self.address = address
        self.max_buffered_spans = max_buffered_spans
        self.dropped_spans = 0
        self._buffer: collections.deque[tuple[bytes, int]] = collections.deque()
        self._buffered_spans = 0
        self._sock: socket.socket | virtio_serial.PortWriter | None = None
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
                    self._sock = _open(self.address)
                except (transport.TransportError, virtio_serial.PortError) as exc:
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


class _RpcSpan:
    """One RPC's span, made in the SDK only when it is first needed."""

    __slots__ = ("_ctx", "_request", "_span", "_start", "_tracing", "error")

    def __init__(self, tracing: Tracing, ctx: ServerContext, request: Any) -> None:
        self._start = time.time_ns()
        self._tracing = tracing
        self._ctx = ctx
        self._request = request
        self._span: Span | None = None
        self.error: Exception | None = None

    def span(self) -> Span:
        if self._span is None:
            ctx = self._ctx
            carrier = {key: values[0] for key, values in ctx.metadata.items() if values}
            if "traceparent" in carrier:
                parent = _propagator.extract(carrier)
            else:
                parent = self._tracing.root_context
            attributes = {"rpc.service": ctx.service, "rpc.method": ctx.method}
            for name in ID_FIELDS:
                value = getattr(self._request, name, "")
                if value:
                    attributes[name] = value
            self._span = tracer.start_span(
                ctx.method, context=parent, attributes=attributes, start_time=self._start
            )
        return self._span

    def end(self, end_time: int) -> None:
        span = self.span()
        if self.error is not None:
            span.record_exception(self.error, timestamp=end_time)
            span.set_status(Status(StatusCode.ERROR, f"{type(self.error).__name__}: {self.error}"))
        span.end(end_time)


_current_rpc: contextvars.ContextVar[_RpcSpan | None] = contextvars.ContextVar(
    "pykata_rpc_span", default=None
)


@contextlib.contextmanager
def step(name: str, attributes: dict[str, str]) -> Iterator[Span]:
    """A span for one step of an RPC (a runtime run, a mount): a child of the
    step it runs in, else of the RPC. A no-op span when tracing is off."""
    context = None
    rpc = _current_rpc.get()
    if rpc is not None and not trace.get_current_span().is_recording():
        context = trace.set_span_in_context(rpc.span())
    with tracer.start_as_current_span(name, context=context, attributes=attributes) as span:
        yield span


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
        self.root_context = trace.set_span_in_context(self.root)

    @contextlib.contextmanager
    def rpc_span(self, ctx: ServerContext, request: Any) -> Iterator[None]:
        """The span of one RPC: named after the method, child of the caller's traceparent.

        Only the start time is taken while the caller waits; the SDK span is
        made on the loop's next turn, after the reply is written (or earlier,
        when a step of the handler needs it as its parent).
        """
        rpc = _RpcSpan(self, ctx, request)
        token = _current_rpc.set(rpc)
        try:
            yield
        except Exception as exc:
            rpc.error = exc
            raise
        finally:
            _current_rpc.reset(token)
            asyncio.get_running_loop().call_soon(rpc.end, time.time_ns())

    def stop(self) -> None:
        self.root.end()
        self.provider.shutdown()  # flushes every span, the root span included
