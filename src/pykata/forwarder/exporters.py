"""Where the forwarder sends spans: an OTLP collector (gRPC or HTTP), a file, or stdout.

Every exporter takes whole ExportTraceServiceRequests. Delivery to a
collector goes through a bounded queue with retry and backoff: a collector
that is down at start or goes away later costs nothing but queued spans,
and those are dropped only when the queue is full - counted and logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import urllib.error
import urllib.request
from typing import IO, Protocol
from urllib.parse import urlparse

import grpc
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from ..otlp import span_count

log = logging.getLogger("pykata.forwarder.exporters")


class Sink(Protocol):
    """Delivers one request; raises (any exception) to have it retried."""

    name: str

    async def send(self, request: ExportTraceServiceRequest) -> None: ...

    async def close(self) -> None: ...


class GrpcSink:
    def __init__(self, endpoint: str, timeout: float = 10.0) -> None:
        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        self.name = f"OTLP/gRPC {endpoint}"
        target = parsed.netloc or parsed.path
        if parsed.scheme == "https":
            self._channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials())
        else:
            self._channel = grpc.aio.insecure_channel(target)
        self._stub = trace_service_pb2_grpc.TraceServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._timeout = timeout

    async def send(self, request: ExportTraceServiceRequest) -> None:
        await self._stub.Export(request, timeout=self._timeout)

    async def close(self) -> None:
        await self._channel.close()


class HttpSink:
    def __init__(self, endpoint: str, timeout: float = 10.0) -> None:
        parsed = urlparse(endpoint)
        self.url = endpoint if parsed.path not in ("", "/") else endpoint.rstrip("/") + "/v1/traces"
        self.name = f"OTLP/HTTP {self.url}"
        self._timeout = timeout

    def _post(self, body: bytes) -> None:
        request = urllib.request.Request(
            self.url, data=body, method="POST", headers={"Content-Type": "application/x-protobuf"}
        )
        with urllib.request.urlopen(request, timeout=self._timeout) as response:
            response.read()

    async def send(self, request: ExportTraceServiceRequest) -> None:
        await asyncio.to_thread(self._post, request.SerializeToString())

    async def close(self) -> None:
        pass


class FileSink:
    """OTLP JSON, one ExportTraceServiceRequest per line (the file exporter's format)."""

    def __init__(self, stream: IO[str], name: str) -> None:
        self._stream = stream
        self.name = f"file {name}"

    async def send(self, request: ExportTraceServiceRequest) -> None:
        line = json.dumps(json_format.MessageToDict(request), separators=(",", ":"))
        self._stream.write(line + "\n")
        self._stream.flush()

    async def close(self) -> None:
        if self._stream is not sys.stdout:
            self._stream.close()


class DumpSink:
    """Spans as readable lines on stdout (--dump-only)."""

    name = "stdout"

    async def send(self, request: ExportTraceServiceRequest) -> None:
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                for span in scope.spans:
                    ms = (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6
                    attrs = {a.key: json_format.MessageToDict(a.value) for a in span.attributes}
                    parent = span.parent_span_id.hex() or "-"
                    print(
                        f"span {span.name!r} trace={span.trace_id.hex()} "
                        f"span={span.span_id.hex()} parent={parent} {ms:.3f}ms "
                        f"{json.dumps(attrs, separators=(',', ':'))}",
                        flush=True,
                    )

    async def close(self) -> None:
        pass


class Queue:
    """A bounded queue in front of a sink, with retry and backoff; it never raises."""

    def __init__(self, sink: Sink, *, max_requests: int = 1024, max_backoff: float = 10.0) -> None:
        self.sink = sink
        self._queue: asyncio.Queue[ExportTraceServiceRequest] = asyncio.Queue(max_requests)
        self._max_backoff = max_backoff
        self.delivered_spans = 0
        self.dropped_spans = 0
        self._task: asyncio.Task[None] | None = None
        self._in_flight: ExportTraceServiceRequest | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._deliver())

    def submit(self, request: ExportTraceServiceRequest) -> None:
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            self.dropped_spans += span_count(request)
            log.warning(
                "queue full: dropped %d span(s) (%d in all) for %s",
                span_count(request),
                self.dropped_spans,
                self.sink.name,
            )

    async def _deliver(self) -> None:
        while True:
            request = self._in_flight = await self._queue.get()
            backoff = 0.1
            while True:
                try:
                    await self.sink.send(request)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the sink is down: keep the spans, try again
                    log.warning(
                        "cannot deliver to %s (%s); retrying in %.1fs",
                        self.sink.name,
                        _reason(exc),
                        backoff,
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self._max_backoff)
            self.delivered_spans += span_count(request)
            self._in_flight = None
            self._queue.task_done()

    async def drain(self, timeout: float) -> None:
        """Deliver what is queued (up to `timeout`), then stop; what is left is counted lost."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            pending = [self._in_flight] if self._in_flight is not None else []
            while not self._queue.empty():
                pending.append(self._queue.get_nowait())
            lost = sum(span_count(r) for r in pending)
            self.dropped_spans += lost
            log.error("gave up delivering %d span(s) to %s at shutdown", lost, self.sink.name)
        if self._task is not None:
            self._task.cancel()
        await self.sink.close()


def _reason(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__
