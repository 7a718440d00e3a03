"""The agent -> trace forwarder stream, sans-IO: records, and the spans in them.

A record is an 8-byte big-endian length, then that many bytes of payload,
as upstream's agent and forwarder frame them. Our agent's payload is a
serialized opentelemetry-proto ExportTraceServiceRequest; upstream's Rust
agent sends one span per record as JSON (forwarder/upstream.py reads it).

The decoder never buffers a record longer than its limit: it skips one
whose header says so, and it finds the next record after bytes that are no
record at all, so bad input costs only itself.

The span encoder writes OTLP protobuf directly (the wire format of the
opentelemetry-proto messages, field by field): the agent pays a few
microseconds per span instead of building protobuf objects. The tests parse
its output with opentelemetry-proto.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

if TYPE_CHECKING:  # loaded by decode_request: the agent only encodes, and need not load it
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

HEADER = struct.Struct(">Q")
#: The default record limit: the OTLP client limit a collector expects per request.
MAX_RECORD = 4 << 20
#: First payload bytes of a record: '{' (upstream's JSON span) or the tag of
#: ExportTraceServiceRequest.resource_spans (ours). Used only to tell a
#: record's header from garbage.
PAYLOAD_STARTS = frozenset(b"{\x0a")
#: A header over the limit is taken for a record (skipped unread) only if it is
#: below this; otherwise the bytes are garbage (text has no zero bytes).
PLAUSIBLE_LENGTH = 1 << 48


class RecordError(ValueError):
    """A record that is not a span record (it alone is dropped)."""


def encode_record(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


@dataclass(frozen=True)
class Skipped:
    """Bytes the decoder dropped, and why (one log line each)."""

    length: int
    reason: str


class RecordDecoder:
    """Splits a stream into record payloads, within a record limit.

    feed() returns payloads (bytes) and Skipped reports, in stream order.
    """

    def __init__(self, max_record: int = MAX_RECORD) -> None:
        self.max_record = max_record
        self._buffer = bytearray()
        self._skip = 0  # bytes of a refused record still to come
        self._garbage = 0  # length of the run of non-record bytes being skipped
        # A header's length fits in the low bytes: the others are zero.
        self._zeros = b"\0" * (HEADER.size - (max_record.bit_length() + 7) // 8)

    @property
    def buffered(self) -> int:
        """Bytes held for a record not complete yet."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes | Skipped]:
        out: list[bytes | Skipped] = []
        if self._skip:
            taken = min(self._skip, len(data))
            self._skip -= taken
            data = data[taken:]
        self._buffer += data
        buf = self._buffer
        offset = 0
        while len(buf) - offset >= HEADER.size:
            (length,) = HEADER.unpack_from(buf, offset)
            if length <= self.max_record and not self._garbage:
                end = offset + HEADER.size + length
                if len(buf) < end:
                    break
                out.append(bytes(buf[offset + HEADER.size : end]))
                offset = end
                continue
            if len(buf) - offset < HEADER.size + 1:
                break  # the payload's first byte tells a header from garbage
            if length <= self.max_record and buf[offset + HEADER.size] in PAYLOAD_STARTS:
                out.append(Skipped(self._garbage, "bytes that are not a record"))
                self._garbage = 0
                continue
            plausible = length < PLAUSIBLE_LENGTH and buf[offset + HEADER.size] in PAYLOAD_STARTS
            if plausible and not self._garbage:
                out.append(Skipped(length, f"a record of {length} bytes exceeds {self.max_record}"))
                available = len(buf) - offset
                self._skip = max(0, HEADER.size + length - available)
                offset += min(available, HEADER.size + length)
                continue
            offset = self._resync(offset)
        del buf[:offset]
        return out

    def _resync(self, offset: int) -> int:
        """Skip to the next place a record header may start; counts the garbage."""
        buf = self._buffer
        candidate = buf.find(self._zeros, offset + 1)
        if candidate < 0:
            candidate = max(offset + 1, len(buf) - HEADER.size)
        self._garbage += candidate - offset
        return candidate

    def end(self) -> Skipped | None:
        """At the end of the stream: what was left incomplete, if anything."""
        if self._garbage:
            return Skipped(self._garbage + len(self._buffer), "bytes that are not a record")
        if self._buffer:
            return Skipped(len(self._buffer), "a record cut off by the end of the connection")
        return None

    def drop_partial(self) -> Skipped | None:
        """Give up the record being received (memory is short): skip the rest of it."""
        if len(self._buffer) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buffer)
        if length > self.max_record or self._garbage:
            return None
        self._skip = HEADER.size + length - len(self._buffer)
        del self._buffer[:]
        return Skipped(length, "the forwarder's receive buffer is full")


def decode_request(payload: bytes) -> ExportTraceServiceRequest:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(payload)
    except DecodeError:
        raise RecordError("neither a JSON span nor an OTLP request (corrupt protobuf)") from None
    return request


def span_count(request: ExportTraceServiceRequest) -> int:
    return sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)


# --- OTLP protobuf, written directly -----------------------------------------------

#: Span.kind (opentelemetry.proto.trace.v1.Span.SpanKind)
INTERNAL, SERVER, CLIENT = 1, 2, 3
#: Status.code
STATUS_OK, STATUS_ERROR = 1, 2
#: Span.flags: the W3C trace flags, and whether the parent is remote.
FLAG_HAS_IS_REMOTE = 0x100
FLAG_IS_REMOTE = 0x200

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")

AttributeValue = str | bool | int | float


_SMALL = [bytes((n,)) for n in range(0x80)]


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, data: bytes) -> bytes:
    """A length-delimited field; `tag` is the encoded (number << 3 | 2)."""
    length = len(data)
    return tag + (_SMALL[length] if length < 0x80 else _varint(length)) + data


def _text(value: str) -> bytes:
    return value.encode("utf-8", "replace")


def any_value(value: AttributeValue, max_length: int = 1 << 30) -> bytes:
    """An AnyValue message; a string is cut to `max_length` characters."""
    if isinstance(value, str):
        return _field(b"\x0a", _text(value[:max_length]))
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)  # int64: two's complement
    return b"\x21" + _F64.pack(value)


#: Encoded attributes seen before (most repeat: rpc.method=Check), up to a bound.
_KEY_VALUES: dict[tuple[str, AttributeValue, type], bytes] = {}
_KEY_VALUES_MAX = 4096


def key_value(key: str, value: AttributeValue, max_length: int = 1 << 30) -> bytes:
    """A KeyValue message; a string value is cut to `max_length` characters."""
    cache_key = (key, value, type(value))  # True and 1 are equal keys otherwise
    encoded = _KEY_VALUES.get(cache_key)
    if encoded is None:
        encoded = _field(b"\x0a", _text(key)) + _field(b"\x12", any_value(value, max_length))
        if len(_KEY_VALUES) >= _KEY_VALUES_MAX:
            _KEY_VALUES.clear()
        if len(encoded) <= 256:
            _KEY_VALUES[cache_key] = encoded
    return encoded


def _attributes(
    tag: bytes, attributes: Mapping[str, AttributeValue], max_length: int = 1 << 30
) -> bytes:
    return b"".join([_field(tag, key_value(k, v, max_length)) for k, v in attributes.items()])


def encode_attributes(attributes: Mapping[str, AttributeValue]) -> bytes:
    """A span's attributes field, encoded once for attributes that repeat (encode_span's
    `encoded_attributes`)."""
    return _attributes(b"\x4a", attributes)


@dataclass(frozen=True)
class Event:
    name: str
    time: int
    attributes: Mapping[str, AttributeValue]


def encode_span(
    *,
    trace_id: bytes,
    span_id: bytes,
    parent_id: bytes,
    name: str,
    kind: int,
    start: int,
    end: int,
    attributes: Mapping[str, AttributeValue],
    flags: int,
    encoded_attributes: bytes = b"",
    trace_state: str = "",
    events: Sequence[Event] = (),
    status: int = 0,
    status_message: str = "",
    max_length: int = 1 << 30,
) -> bytes:
    """A Span message (opentelemetry.proto.trace.v1.Span), fields in number order.

    String attribute values and the status message are cut to `max_length` characters.
    """
    parts = [b"\x0a\x10", trace_id, b"\x12\x08", span_id]
    if trace_state:
        parts.append(_field(b"\x1a", _text(trace_state)))
    if parent_id:
        parts += (b"\x22\x08", parent_id)
    parts += (
        _field(b"\x2a", _text(name)),
        b"\x30",
        _varint(kind),
        b"\x39",
        _U64.pack(start),
        b"\x41",
        _U64.pack(end),
        encoded_attributes,
        _attributes(b"\x4a", attributes, max_length),
    )
    for event in events:
        body = b"\x09" + _U64.pack(event.time) + _field(b"\x12", _text(event.name))
        attrs = _attributes(b"\x1a", event.attributes, max_length)
        parts.append(_field(b"\x5a", body + attrs))
    if status:
        text = status_message[:max_length]
        message = _field(b"\x12", _text(text)) if text else b""
        parts.append(_field(b"\x7a", message + b"\x18" + _varint(status)))
    parts += (b"\x85\x01", _U32.pack(flags))
    return b"".join(parts)


def encode_resource_scope(
    resource: Mapping[str, AttributeValue], scope: str, version: str = ""
) -> tuple[bytes, bytes]:
    """The Resource and InstrumentationScope fields of a ResourceSpans / ScopeSpans."""
    scope_body = _field(b"\x0a", _text(scope))
    if version:
        scope_body += _field(b"\x12", _text(version))
    return _field(b"\x0a", _attributes(b"\x0a", resource)), _field(b"\x0a", scope_body)


def encode_request(resource: bytes, scope: bytes, spans: Iterable[bytes]) -> bytes:
    """An ExportTraceServiceRequest of encoded spans from one resource and scope."""
    scope_spans = scope + b"".join([_field(b"\x12", span) for span in spans])
    return _field(b"\x0a", resource + _field(b"\x12", scope_spans))
