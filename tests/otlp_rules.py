"""Reading `kata-trace-forwarder --output` files as the OTLP specification says, with
a reader that is not ours: OpenTelemetry's own OTLP/JSON codec
(opentelemetry-proto-json), plus the rules it is lenient about (it ignores
keys it does not know, so snake_case keys would pass it silently; it
accepts upper-case hex)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from google.protobuf.message import Message
from opentelemetry.proto_json.collector.trace.v1.trace_service import (
    ExportTraceServiceRequest as JsonRequest,
)

LOWER_CAMEL = re.compile(r"[a-z][a-zA-Z0-9]*")
ID_LENGTHS = {"traceId": 32, "spanId": 16, "parentSpanId": 16}
ENUM_KEYS = {"kind", "code"}


def rule_violations(node: Any, path: str = "") -> list[str]:
    """Keys not lowerCamelCase, enums not integers, ids not lowercase hex of their length."""
    found: list[str] = []
    if isinstance(node, list):
        for n, item in enumerate(node):
            found += rule_violations(item, f"{path}[{n}]")
        return found
    if not isinstance(node, dict):
        return found
    for key, value in node.items():
        where = f"{path}.{key}"
        if not LOWER_CAMEL.fullmatch(key):
            found.append(f"{where}: key is not lowerCamelCase")
        if key in ENUM_KEYS and not isinstance(value, int):
            found.append(f"{where}: enum {value!r} is not an integer")
        if key in ID_LENGTHS and not re.fullmatch(f"[0-9a-f]{{{ID_LENGTHS[key]}}}", str(value)):
            found.append(f"{where}: {value!r} is not a lowercase hex id")
        found += rule_violations(value, where)
    return found


def read_otlp_json(path: Path) -> list[JsonRequest]:
    """Every line of the file, checked against the rules and read by the reference codec."""
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        problems = rule_violations(json.loads(line))
        assert not problems, f"line {number}: {problems[:5]}"
        requests.append(JsonRequest.from_json(line))
    return requests


def json_spans(requests: list[JsonRequest]) -> list[tuple[dict[str, Any], Any]]:
    """(resource attributes, span) for every span."""
    out = []
    for request in requests:
        for resource_spans in request.resource_spans or []:
            resource = {
                a.key: a.value.string_value
                for a in (resource_spans.resource.attributes if resource_spans.resource else [])
            }
            for scope_spans in resource_spans.scope_spans or []:
                out += [(resource, span) for span in scope_spans.spans or []]
    return out


def differences(read: Any, expected: Message, path: str = "span") -> list[str]:
    """Where an object read by the reference codec differs from the protobuf we expect."""
    found: list[str] = []
    for field in expected.DESCRIPTOR.fields:
        got = getattr(read, field.name, None)
        want = getattr(expected, field.name)
        where = f"{path}.{field.name}"
        if field.message_type is not None and field.is_repeated:
            got = got or []
            if len(got) != len(want):
                found.append(f"{where}: {len(got)} items, expected {len(want)}")
                continue
            for n, (g, w) in enumerate(zip(got, want, strict=True)):
                found += differences(g, w, f"{where}[{n}]")
        elif field.message_type is not None:
            if expected.HasField(field.name):
                found += differences(got, want, where)
        elif field.is_repeated:
            if list(got or []) != list(want):
                found.append(f"{where}: {got!r} != {want!r}")
        else:
            if got is None:
                got = type(want)()
            if isinstance(want, float) and math.isnan(want):
                if not (isinstance(got, float) and math.isnan(got)):
                    found.append(f"{where}: {got!r} is not NaN")
            elif got != want:
                found.append(f"{where}: {got!r} != {want!r}")
    return found
