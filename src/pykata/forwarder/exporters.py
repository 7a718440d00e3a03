"""Where the forwarder sends spans: an OTLP collector (gRPC or HTTP), a file, or stdout.

Requests wait in a queue bounded in bytes, serialized (a queued request costs
its size and no more); delivery joins what is queued into requests of up to
`max_export` bytes (serialized ExportTraceServiceRequests concatenate into
one) and retries with backoff while the collector is down. Spans are dropped
only when the queue is full, or when the collector refuses them for good
(the OTLP specification's non-retryable answers) - counted and logged.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import sys
import time
import urllib.error
import urllib.request
from typing import IO, Protocol
from urllib.parse import urlparse

import grpc
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from .. import otlpjson
from ..otlp import span_count

log = logging.getLogger("pykata.forwarder.exporters")

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
#: The OTLP specification's retryable gRPC codes (RESOURCE_EXHAUSTED only with RetryInfo,
#: which a plain status does not carry: not retried).
RETRYABLE_GRPC = {
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
}
RETRYABLE_HTTP = {429, 502, 503, 504}


class Refused(Exception):
    """The collector refused the request for good: retrying would not help."""


class Sink(Protocol):
    """Delivers one serialized request: raises Refused to drop it, any other
    exception to have it retried. Returns how many spans the receiver rejected."""

    name: str

    async def send(self, request: bytes) -> int: ...

    async def close(self) -> None: ...


def _rejected(response: ExportTraceServiceResponse) -> int:
    if response.HasField("partial_success"):
        partial = response.partial_success
        if partial.rejected_spans or partial.error_message:
            log.warning(
                "the collector rejected %d span(s): %s",
                partial.rejected_spans,
                partial.error_message,
            )
        return int(partial.rejected_spans)
    return 0


class GrpcSink:
    def __init__(self, endpoint: str, timeout: float = 10.0) -> None:
        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        self.name = f"OTLP/gRPC {endpoint}"
        target = parsed.netloc or parsed.path
        if parsed.scheme == "https":
            self._channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials())
        else:
            self._channel = grpc.aio.insecure_channel(target)
        # Requests are already serialized: the call takes them as they are.
        self._export = self._channel.unary_unary(
            EXPORT_METHOD, response_deserializer=ExportTraceServiceResponse.FromString
        )
        self._timeout = timeout

    async def send(self, request: bytes) -> int:
        try:
            response = await self._export(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in RETRYABLE_GRPC:
                raise
            raise Refused(_reason(exc)) from None
        return _rejected(response)

    async def close(self) -> None:
        await self._channel.close()


class HttpSink:
    def __init__(self, endpoint: str, timeout: float = 10.0) -> None:
        parsed = urlparse(endpoint)
        self.url = endpoint if parsed.path not in ("", "/") else endpoint.rstrip("/") + "/v1/traces"
        self.name = f"OTLP/HTTP {self.url}"
        self._timeout = timeout

    def _post(self, body: bytes) -> int:
        request = urllib.request.Request(
            self.url, data=body, method="POST", headers={"Content-Type": "application/x-protobuf"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                answer = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code in RETRYABLE_HTTP:
                raise
            raise Refused(f"HTTP {exc.code} {exc.reason}") from None
        return _rejected(ExportTraceServiceResponse.FromString(answer))

    async def send(self, request: bytes) -> int:
        return await asyncio.to_thread(self._post, request)

    async def close(self) -> None:
        pass


class FileSink:
    """OTLP/JSON, one ExportTraceServiceRequest per line (the OTLP file exporter's format)."""

    def __init__(self, stream: IO[str], name: str) -> None:
        self._stream = stream
        self.name = f"file {name}"

    async def send(self, request: bytes) -> int:
        self._stream.write(otlpjson.dumps(ExportTraceServiceRequest.FromString(request)) + "\n")
        self._stream.flush()
        return 0

    async def close(self) -> None:
        if self._stream is not sys.stdout:
            self._stream.close()


class DumpSink:
    """Spans as readable lines on stdout (--dump-only)."""

    name = "stdout"

    async def send(self, request: bytes) -> int:
        message = ExportTraceServiceRequest.FromString(request)
        for resource in message.resource_spans:
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
        return 0

    async def close(self) -> None:
        pass


class Queue:
    """A queue in front of a sink, bounded in bytes, with retry and backoff; never raises."""

    def __init__(
        self,
        sink: Sink,
        *,
        max_bytes: int = 64 << 20,
        max_export: int = 4 << 20,
        max_backoff: float = 10.0,
    ) -> None:
        self.sink = sink
        self.max_bytes = max_bytes
        self.max_export = max_export
        self._items: collections.deque[tuple[bytes, int]] = collections.deque()
        self.queued_bytes = 0  # queued and in delivery
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._max_backoff = max_backoff
        self.delivered_spans = 0
        self.dropped_spans = 0
        self._task: asyncio.Task[None] | None = None
        self._in_flight: list[tuple[bytes, int]] = []
        self._last_warning = 0.0

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._deliver())

    def submit(self, request: ExportTraceServiceRequest) -> None:
        body = request.SerializeToString()
        spans = span_count(request)
        if self.queued_bytes + len(body) > self.max_bytes:
            self._drop(spans, f"queue full ({self.queued_bytes} of {self.max_bytes} bytes)")
            return
        self._items.append((body, spans))
        self.queued_bytes += len(body)
        self._idle.clear()
        self._arrived.set()

    def _drop(self, spans: int, why: str) -> None:
        self.dropped_spans += spans
        now = time.monotonic()
        if now - self._last_warning >= 1.0:  # at most a line a second, with the running total
            self._last_warning = now
            log.warning(
                "%s: dropped %d span(s), %d in all, for %s",
                why,
                spans,
                self.dropped_spans,
                self.sink.name,
            )

    def _take(self) -> list[tuple[bytes, int]]:
        """The next export: queued requests joined up to max_export bytes (at least one)."""
        batch = [self._items.popleft()]
        size = len(batch[0][0])
        while self._items and size + len(self._items[0][0]) <= self.max_export:
            item = self._items.popleft()
            size += len(item[0])
            batch.append(item)
        return batch

    async def _deliver(self) -> None:
        while True:
            if not self._items:
                self._idle.set()
                self._arrived.clear()
                await self._arrived.wait()
                continue
            batch = self._in_flight = self._take()
            body = b"".join(item[0] for item in batch)
            spans = sum(item[1] for item in batch)
            backoff = 0.1
            while True:
                try:
                    rejected = await self.sink.send(body)
                    self.delivered_spans += spans - rejected
                    self.dropped_spans += rejected
                    break
                except asyncio.CancelledError:
                    raise
                except Refused as exc:
                    self._drop(spans, f"{self.sink.name} refused them ({exc})")
                    break
                except Exception as exc:  # the sink is down: keep the spans, try again
                    log.warning(
                        "cannot deliver to %s (%s); retrying in %.1fs",
                        self.sink.name,
                        _reason(exc),
                        backoff,
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self._max_backoff)
            self._in_flight = []
            self.queued_bytes -= len(body)

    async def drain(self, timeout: float) -> None:
        """Deliver what is queued (up to `timeout`), then stop; what is left is counted lost."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            lost = sum(item[1] for item in [*self._in_flight, *self._items])
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
