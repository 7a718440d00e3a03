"""The agent -> trace forwarder stream: OTLP requests in length-prefixed records.

Each record is an 8-byte big-endian length, then that many bytes of a
serialized opentelemetry-proto ExportTraceServiceRequest: a stable,
versioned encoding any collector understands (upstream's Rust-specific
payload broke when its libraries moved). Sans-IO, like the ttRPC framing.
"""

from __future__ import annotations

import struct

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

HEADER = struct.Struct(">Q")
#: Larger records are refused: a batch of spans is far smaller.
MAX_RECORD = 64 << 20


class RecordError(ValueError):
    """The stream is not a sequence of records (the connection should be dropped)."""


def encode_record(payload: bytes) -> bytes:
    if len(payload) > MAX_RECORD:
        raise RecordError(f"record of {len(payload)} bytes exceeds {MAX_RECORD}")
    return HEADER.pack(len(payload)) + payload


class RecordDecoder:
    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        records = []
        offset = 0
        while len(self._buffer) - offset >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer, offset)
            if length > MAX_RECORD:
                raise RecordError(f"record length {length} exceeds {MAX_RECORD}: not a span stream")
            end = offset + HEADER.size + length
            if len(self._buffer) < end:
                break
            records.append(bytes(self._buffer[offset + HEADER.size : end]))
            offset = end
        del self._buffer[:offset]
        return records

    def at_record_boundary(self) -> bool:
        return not self._buffer


def decode_request(payload: bytes) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(payload)
    except DecodeError as exc:
        raise RecordError(f"record is not an OTLP ExportTraceServiceRequest: {exc}") from None
    return request


def span_count(request: ExportTraceServiceRequest) -> int:
    return sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
