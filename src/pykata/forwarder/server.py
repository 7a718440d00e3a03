"""Accepting agent connections and turning their records into export requests.

Each record is told apart by its first byte: upstream's Rust agent sends a
JSON span ('{'), ours an OTLP protobuf request. A record of neither shape is
dropped alone, with one log line. Memory is bounded: a record over the
record limit is skipped unread, the records being received on all
connections together hold at most `receive_limit` bytes (past it the
record that would grow them is dropped), and connections past
`max_connections` are closed at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from .. import transport
from ..otlp import MAX_RECORD, RecordDecoder, RecordError, Skipped, decode_request, span_count
from . import upstream

log = logging.getLogger("pykata.forwarder")

#: Service names that --trace-name replaces: none, the SDKs' defaults (upstream's
#: agent sends opentelemetry-rust's "unknown_service"), and our agent's own.
AGENT_SERVICE_NAMES = ("", "kata-agent")


def name_service(request: ExportTraceServiceRequest, name: str) -> None:
    """--trace-name: the agent's resources get service.name NAME; others (kata-agent-ctl)
    keep theirs."""
    for resource_spans in request.resource_spans:
        attributes = resource_spans.resource.attributes
        for attribute in attributes:
            if attribute.key == "service.name":
                current = attribute.value.string_value
                if current in AGENT_SERVICE_NAMES or current.startswith("unknown_service"):
                    attribute.value.string_value = name
                break
        else:
            attributes.append(KeyValue(key="service.name", value=AnyValue(string_value=name)))


def decode_record(payload: bytes) -> ExportTraceServiceRequest:
    """The export request a record carries; RecordError if it is neither shape."""
    if upstream.is_upstream(payload):
        return upstream.span_request(payload)
    request = decode_request(payload)
    if not span_count(request):
        raise RecordError("neither a JSON span nor an OTLP request (no span in it)")
    return request


@dataclass
class Limits:
    max_record: int = MAX_RECORD
    #: Bytes of records being received, all connections together.
    receive_limit: int = 32 << 20
    max_connections: int = 256


@dataclass
class Receiving:
    """What the connections hold together, and what they dropped."""

    limits: Limits
    connections: set[AgentConnection] = field(default_factory=set)
    buffered: int = 0
    dropped_records: int = 0
    #: When a connection last delivered bytes (monotonic seconds).
    last_data: float = 0.0

    async def settle(self, quiet: float = 0.05, limit: float = 2.0) -> None:
        """Until the open connections have delivered what they had sent (no bytes for
        `quiet` seconds), at most `limit`: records already sent are not lost at stop."""
        deadline = time.monotonic() + limit
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(quiet)
            if time.monotonic() - self.last_data >= quiet:
                return


class AgentConnection(asyncio.Protocol):
    def __init__(
        self,
        deliver: Callable[[ExportTraceServiceRequest], None],
        trace_name: str,
        receiving: Receiving,
    ) -> None:
        self._deliver = deliver
        self._trace_name = trace_name
        self._receiving = receiving
        self._decoder = RecordDecoder(receiving.limits.max_record)
        self._held = 0  # this connection's share of receiving.buffered
        self._transport: asyncio.Transport | None = None
        self.spans = 0

    def connection_made(self, transport_: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport_)
        connections = self._receiving.connections
        if len(connections) >= self._receiving.limits.max_connections:
            log.warning(
                "refusing an agent connection: %d already open (the limit)", len(connections)
            )
            self._transport.abort()
            return
        connections.add(self)
        log.info("agent connected")

    def data_received(self, data: bytes) -> None:
        self._receiving.last_data = time.monotonic()
        items = self._decoder.feed(data)
        self._account()
        if self._receiving.buffered > self._receiving.limits.receive_limit:
            dropped = self._decoder.drop_partial()
            if dropped is not None:
                items.append(dropped)
            self._account()
        for item in items:
            if isinstance(item, Skipped):
                self._skipped(item)
            else:
                self._record(item)

    def _record(self, payload: bytes) -> None:
        try:
            request = decode_record(payload)
        except RecordError as exc:
            self._receiving.dropped_records += 1
            log.warning("dropping a record of %d bytes: %s", len(payload), exc)
            return
        if self._trace_name:
            name_service(request, self._trace_name)
        self.spans += span_count(request)
        self._deliver(request)

    def _skipped(self, skipped: Skipped) -> None:
        self._receiving.dropped_records += 1
        log.warning("skipping %d bytes: %s", skipped.length, skipped.reason)

    def _account(self) -> None:
        held = self._decoder.buffered
        self._receiving.buffered += held - self._held
        self._held = held

    def connection_lost(self, exc: Exception | None) -> None:
        if self not in self._receiving.connections:
            return
        self._receiving.connections.discard(self)
        self._receiving.buffered -= self._held
        self._held = 0
        leftover = self._decoder.end()
        if leftover is not None:
            self._skipped(leftover)
        log.info("agent disconnected", extra={"spans": self.spans})


async def listen(
    address: str,
    deliver: Callable[[ExportTraceServiceRequest], None],
    trace_name: str,
    receiving: Receiving,
) -> transport.Listener:
    return await transport.listen(address, lambda: AgentConnection(deliver, trace_name, receiving))
