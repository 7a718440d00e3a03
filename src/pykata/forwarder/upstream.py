"""Records from upstream's Rust agent: one opentelemetry-rust 0.17 SpanData each, as JSON.

Upstream's vsock exporter (kata-containers src/agent/vsock-exporter) writes
`serde_json::to_vec(&span)` per record. serde's derived shapes: a struct is
an object of its fields, a newtype struct is its content (SpanId -> a
number), a unit enum variant is its name ("Server"), a variant with data is
{"Variant": data}, Option is null or the value, SystemTime is
{"secs_since_epoch", "nanos_since_epoch"}. So a span reads:

    {"span_context": {"trace_id": <u128>, "span_id": <u64>, "trace_flags": <u8>,
                      "is_remote": bool, "trace_state": null | [[key, value], ...]},
     "parent_span_id": <u64, 0 for none>, "span_kind": "Client"|"Server"|"Producer"|
     "Consumer"|"Internal", "name": str, "start_time": <SystemTime>, "end_time": <SystemTime>,
     "attributes": {"map": {key: <Value>}, "evict_list": [key, ...], "max_len": n,
                    "dropped_count": n},
     "events": {"queue": null | [{"name", "timestamp", "attributes": [{"key", "value"}],
                                  "dropped_attributes_count"}], "max_len", "dropped_count"},
     "links": {"queue": null | [{"span_context", "attributes", "dropped_attributes_count"}],
               "max_len", "dropped_count"},
     "status_code": "Unset"|"Ok"|"Error", "status_message": str,
     "resource": null | {"attrs": {key: <Value>}}}

with <Value> one of {"Bool": b}, {"I64": n}, {"F64": x}, {"String": s} and
{"Array": {"Bool"|"I64"|"F64"|"String": [...]}}. The instrumentation
library is not serialized (`serde(skip)`): the scope stays empty. serde_json
writes a non-finite float as null: it becomes NaN.
"""

from __future__ import annotations

import json
import math
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from ..otlp import FLAG_HAS_IS_REMOTE, FLAG_IS_REMOTE, RecordError

KINDS: dict[str, int] = {
    "Internal": Span.SPAN_KIND_INTERNAL,
    "Server": Span.SPAN_KIND_SERVER,
    "Client": Span.SPAN_KIND_CLIENT,
    "Producer": Span.SPAN_KIND_PRODUCER,
    "Consumer": Span.SPAN_KIND_CONSUMER,
}
STATUS: dict[str, int] = {
    "Unset": Status.STATUS_CODE_UNSET,
    "Ok": Status.STATUS_CODE_OK,
    "Error": Status.STATUS_CODE_ERROR,
}


def is_upstream(payload: bytes) -> bool:
    """A JSON object: upstream's span (ours are protobuf, which never starts with '{')."""
    return payload[:1] == b"{"


def span_request(payload: bytes) -> ExportTraceServiceRequest:
    """The OTLP request carrying the one span of an upstream record."""
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"not JSON: {exc}") from None
    try:
        return _request(_object(data, "the record"))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise RecordError(f"not an opentelemetry-rust 0.17 SpanData: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"no field {exc.args[0]!r}"
    return str(exc)


def _request(data: dict[str, Any]) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource = data.get("resource")
    if resource is not None:
        attrs = _object(_object(resource, "resource")["attrs"], "resource.attrs")
        resource_spans.resource.attributes.extend(_key_values(attrs.items()))
    span = resource_spans.scope_spans.add().spans.add()
    context = _object(data["span_context"], "span_context")
    span.trace_id = _id(context["trace_id"], 16, "trace_id")
    span.span_id = _id(context["span_id"], 8, "span_id")
    span.trace_state = _trace_state(context.get("trace_state"))
    # The parent's remoteness is not in SpanData: only the trace flags are known.
    span.flags = _int(context["trace_flags"], 0, 0xFF, "trace_flags")
    parent = _int(data["parent_span_id"], 0, (1 << 64) - 1, "parent_span_id")
    if parent:
        span.parent_span_id = parent.to_bytes(8, "big")
    span.name = _str(data["name"], "name")
    span.kind = _enum(KINDS, data["span_kind"], "span_kind")  # type: ignore[assignment]
    span.start_time_unix_nano = _time(data["start_time"], "start_time")
    span.end_time_unix_nano = _time(data["end_time"], "end_time")
    attributes = _object(data["attributes"], "attributes")
    span.attributes.extend(_key_values(_in_insertion_order(attributes)))
    span.dropped_attributes_count = _count(attributes["dropped_count"], "attributes.dropped_count")
    events = _object(data["events"], "events")
    for event in _queue(events, "events"):
        span.events.append(_event(_object(event, "event")))
    span.dropped_events_count = _count(events["dropped_count"], "events.dropped_count")
    links = _object(data["links"], "links")
    for link in _queue(links, "links"):
        span.links.append(_link(_object(link, "link")))
    span.dropped_links_count = _count(links["dropped_count"], "links.dropped_count")
    span.status.code = _enum(STATUS, data["status_code"], "status_code")  # type: ignore[assignment]
    span.status.message = _str(data.get("status_message", ""), "status_message")
    return request


def _in_insertion_order(attributes: dict[str, Any]) -> list[tuple[str, Any]]:
    """EvictedHashMap: a HashMap (no order) and evict_list, newest first."""
    values = _object(attributes["map"], "attributes.map")
    order = attributes.get("evict_list") or []
    if not isinstance(order, list):
        raise TypeError("attributes.evict_list is not a list")
    ordered = [key for key in reversed(order) if key in values]
    ordered += [key for key in values if key not in set(ordered)]
    return [(key, values[key]) for key in ordered]


def _event(data: dict[str, Any]) -> Span.Event:
    return Span.Event(
        name=_str(data["name"], "event.name"),
        time_unix_nano=_time(data["timestamp"], "event.timestamp"),
        attributes=_key_values(_pairs(data["attributes"], "event.attributes")),
        dropped_attributes_count=_count(
            data.get("dropped_attributes_count", 0), "event.dropped_attributes_count"
        ),
    )


def _link(data: dict[str, Any]) -> Span.Link:
    context = _object(data["span_context"], "link.span_context")
    remote = context["is_remote"]
    if not isinstance(remote, bool):
        raise TypeError("link.span_context.is_remote is not a boolean")
    flags = _int(context["trace_flags"], 0, 0xFF, "link trace_flags") | FLAG_HAS_IS_REMOTE
    return Span.Link(
        trace_id=_id(context["trace_id"], 16, "link trace_id"),
        span_id=_id(context["span_id"], 8, "link span_id"),
        trace_state=_trace_state(context.get("trace_state")),
        attributes=_key_values(_pairs(data["attributes"], "link.attributes")),
        dropped_attributes_count=_count(
            data.get("dropped_attributes_count", 0), "link.dropped_attributes_count"
        ),
        flags=flags | (FLAG_IS_REMOTE if remote else 0),
    )


def _pairs(items: Any, where: str) -> list[tuple[str, Any]]:
    if not isinstance(items, list):
        raise TypeError(f"{where} is not a list")
    return [(_object(kv, where)["key"], kv["value"]) for kv in items]


def _key_values(items: Any) -> list[KeyValue]:
    return [KeyValue(key=_str(key, "attribute key"), value=_value(value)) for key, value in items]


def _value(value: Any) -> AnyValue:
    kind, content = _variant(value, "attribute value")
    if kind == "Array":
        item_kind, items = _variant(content, "array value")
        if not isinstance(items, list):
            raise TypeError(f"array value {content!r} does not hold a list")
        return AnyValue(array_value=ArrayValue(values=[_scalar(item_kind, v) for v in items]))
    return _scalar(kind, content)


def _variant(value: Any, where: str) -> tuple[str, Any]:
    """An enum variant with data: {"Variant": data}."""
    items = list(_object(value, where).items())
    if len(items) != 1:
        raise ValueError(f"{where} {str(value)[:80]} is not one variant")
    return items[0]


def _scalar(kind: str, content: Any) -> AnyValue:
    if kind == "Bool" and isinstance(content, bool):
        return AnyValue(bool_value=content)
    if kind == "I64" and isinstance(content, int) and not isinstance(content, bool):
        return AnyValue(int_value=_int(content, -(1 << 63), (1 << 63) - 1, "I64 value"))
    if kind == "F64" and content is None:
        return AnyValue(double_value=math.nan)  # serde_json's NaN and infinities
    if kind == "F64" and isinstance(content, int | float) and not isinstance(content, bool):
        return AnyValue(double_value=float(content))
    if kind == "String" and isinstance(content, str):
        return AnyValue(string_value=content)
    raise ValueError(f"{kind!r} value {content!r} is not a Bool, I64, F64, String or Array")


def _queue(queue: dict[str, Any], where: str) -> list[Any]:
    """EvictedQueue: its items (null when none was ever added)."""
    items = queue.get("queue")
    if items is None:
        return []
    if not isinstance(items, list):
        raise TypeError(f"{where}.queue is not a list")
    return items


def _trace_state(value: Any) -> str:
    """TraceState: null or [[key, value], ...] -> the W3C tracestate header."""
    if value is None:
        return ""
    if not isinstance(value, list):
        raise TypeError("trace_state is not a list")
    members = []
    for member in value:
        if not (isinstance(member, list) and len(member) == 2):
            raise TypeError(f"trace_state member {member!r} is not a [key, value] pair")
        members.append(f"{_str(member[0], 'trace_state key')}={_str(member[1], 'value')}")
    return ",".join(members)


def _time(value: Any, where: str) -> int:
    value = _object(value, where)
    seconds = _int(value["secs_since_epoch"], 0, (1 << 64) - 1, where)
    nanos = _int(value["nanos_since_epoch"], 0, 999_999_999, where)
    total = seconds * 1_000_000_000 + nanos
    if total >= 1 << 64:
        raise ValueError(f"{where} is past what OTLP can carry")
    return total


def _id(value: Any, size: int, where: str) -> bytes:
    return _int(value, 0, (1 << (8 * size)) - 1, where).to_bytes(size, "big")


def _count(value: Any, where: str) -> int:
    return _int(value, 0, (1 << 32) - 1, where)


def _int(value: Any, low: int, high: int, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{where} is not an integer: {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{where} {value} is out of range")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{where} is not a string: {value!r}")
    return value


def _enum(table: dict[str, int], value: Any, where: str) -> int:
    if value not in table:
        raise ValueError(f"{where} {value!r} is not one of {', '.join(table)}")
    return table[value]


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{where} is not an object: {str(value)[:80]}")
    return value
