"""OTLP/JSON: protobuf's JSON mapping with the OTLP specification's deviations.

The OTLP specification (opentelemetry-proto docs/specification.md, "JSON
Protobuf Encoding") takes proto3's JSON mapping and changes it: trace and
span ids are hex strings (not base64), enums are integers (never names),
keys are lowerCamelCase; 64-bit integers stay decimal strings, and a
reader ignores fields it does not know.

`dumps` writes that; `loads` reads it, and also the files older versions
of kata-trace-forwarder wrote (base64 ids, enum names): an id's length says
which (16 bytes: 32 hex digits or 24 base64 characters; 8 bytes: 16 or 12).
It reads what other tools write as the specification allows a reader to
take it: hex in either case, the proto field names (`trace_id`) as well as
the JSON names (`traceId`), and OTLP before 0.19 (`instrumentationLibrarySpans`).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterator
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

#: The id fields of a span and of a link, and their lengths in bytes.
SPAN_IDS = {"traceId": 16, "spanId": 8, "parentSpanId": 8}
LINK_IDS = {"traceId": 16, "spanId": 8}


def dumps(request: ExportTraceServiceRequest) -> str:
    """One request as one line of OTLP/JSON."""
    data = json_format.MessageToDict(request, use_integers_for_enums=True)
    _convert_ids(data, _base64_to_hex)
    return json.dumps(data, separators=(",", ":"))


def loads(text: str | bytes) -> ExportTraceServiceRequest:
    """One request from OTLP/JSON (hex ids) or protobuf's JSON mapping (base64 ids).

    Raises ValueError saying what is wrong.
    """
    return from_data(json.loads(text))


def from_data(data: Any) -> ExportTraceServiceRequest:
    """As `loads`, from the JSON already parsed (it is changed in place)."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    _convert_ids(data, _to_base64)
    request = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(data, request, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise ValueError(str(exc)) from None
    return request


def _spans(data: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for resource_spans in _list(_get(data, "resourceSpans")):
        resource_spans = _dict(resource_spans)
        for old in ("instrumentationLibrarySpans", "instrumentation_library_spans"):
            # OTLP before 0.19: the same message under its old name
            for library_spans in _list(resource_spans.pop(old, None)):
                library_spans = _dict(library_spans)
                library = library_spans.pop(
                    "instrumentationLibrary", library_spans.pop("instrumentation_library", None)
                )
                if library is not None:
                    library_spans["scope"] = library
                resource_spans.setdefault("scopeSpans", []).append(library_spans)
        for scope_spans in _list(_get(resource_spans, "scopeSpans")):
            for span in _list(_get(_dict(scope_spans), "spans")):
                yield _dict(span)


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


def _get(message: dict[str, Any], name: str) -> Any:
    """A field by its JSON name or its proto name (a reader must accept both)."""
    return message.get(name, message.get(_snake(name)))


def _convert_ids(data: dict[str, Any], convert: Callable[[str, int], str]) -> None:
    for span in _spans(data):
        _convert_fields(span, SPAN_IDS, convert)
        for link in _list(_get(span, "links")):
            _convert_fields(_dict(link), LINK_IDS, convert)


def _convert_fields(
    message: dict[str, Any], fields: dict[str, int], convert: Callable[[str, int], str]
) -> None:
    for camel, size in fields.items():
        for name in (camel, _snake(camel)):
            value = message.get(name)
            if isinstance(value, str) and value:
                message[name] = convert(value, size)


def _base64_to_hex(value: str, size: int) -> str:
    return base64.b64decode(value).hex()


def _to_base64(value: str, size: int) -> str:
    """An id as protobuf's JSON parser wants it: hex (OTLP) or base64 (older files)."""
    if len(value) == 2 * size:
        try:
            return base64.b64encode(bytes.fromhex(value)).decode()
        except ValueError:
            raise ValueError(f"id {value!r} is not {size} bytes in hex") from None
    try:
        if len(base64.b64decode(value, validate=True)) == size:
            return value
    except binascii.Error:
        pass
    raise ValueError(f"id {value!r} is neither {size} bytes in hex nor in base64")


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
