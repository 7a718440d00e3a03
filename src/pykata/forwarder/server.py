"""Accepting agent connections and turning their records into export requests."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from .. import transport
from ..otlp import RecordDecoder, RecordError, decode_request, span_count

log = logging.getLogger("pykata.forwarder")


def name_service(request: ExportTraceServiceRequest, name: str) -> None:
    """Set service.name on every resource (--trace-name), as upstream's forwarder names it."""
    for resource_spans in request.resource_spans:
        attributes = resource_spans.resource.attributes
        for attribute in attributes:
            if attribute.key == "service.name":
                attribute.value.string_value = name
                break
        else:
            attributes.append(KeyValue(key="service.name", value=AnyValue(string_value=name)))


class AgentConnection(asyncio.Protocol):
    def __init__(
        self, deliver: Callable[[ExportTraceServiceRequest], None], trace_name: str
    ) -> None:
        self._deliver = deliver
        self._trace_name = trace_name
        self._decoder = RecordDecoder()
        self._transport: asyncio.Transport | None = None
        self.spans = 0

    def connection_made(self, transport_: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport_)
        log.info("agent connected")

    def data_received(self, data: bytes) -> None:
        try:
            for record in self._decoder.feed(data):
                request = decode_request(record)
                if self._trace_name:
                    name_service(request, self._trace_name)
                self.spans += span_count(request)
                self._deliver(request)
        except RecordError as exc:
            log.warning("dropping a connection: %s", exc)
            assert self._transport is not None
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._decoder.at_record_boundary():
            log.warning("agent connection ended in the middle of a record")
        log.info("agent disconnected", extra={"spans": self.spans})


async def listen(
    address: str, deliver: Callable[[ExportTraceServiceRequest], None], trace_name: str
) -> transport.Listener:
    return await transport.listen(address, lambda: AgentConnection(deliver, trace_name))
