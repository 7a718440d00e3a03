"""The agent API's OCI spec (grpc.Spec) as the runtime's config.json.

The protobuf field names are Go-style (UIDMappings, OOMScoreAdj); config.json
uses lowerCamel (uidMappings, oomScoreAdj). Empty and zero values are left
out, as proto3 cannot tell them from unset.
"""

from __future__ import annotations

import re
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

_SPECIAL = {"Version": "ociVersion", "errnoret": "errnoRet", "Pagesize": "pageSize"}


def json_name(field: str) -> str:
    """UIDMappings -> uidMappings, OOMScoreAdj -> oomScoreAdj, CPU -> cpu, Args -> args."""
    if field in _SPECIAL:
        return _SPECIAL[field]
    match = re.match(r"[A-Z0-9]+(?=[A-Z][a-z]|$)|[A-Z]", field)
    if not match:
        return field
    head = match.group(0)
    return head.lower() + field[len(head) :]


def to_json(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        name = json_name(field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[name] = {
                k: _value(field.message_type.fields_by_name["value"], v) for k, v in value.items()
            }
        elif field.is_repeated:
            out[name] = [_value(field, v) for v in value]
        else:
            out[name] = _value(field, value)
    return out


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return to_json(value)
    return value


def from_json(data: dict[str, Any], message: Message) -> list[str]:
    """Fill `message` from a config.json-style dict; returns the keys it has no field for."""
    fields = {json_name(f.name): f for f in message.DESCRIPTOR.fields}
    unknown: list[str] = []
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            unknown.append(key)
            continue
        target = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for k, v in value.items():
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    unknown += [f"{key}.{k}.{u}" for u in from_json(v, target[k])]
                else:
                    target[k] = v
        elif field.is_repeated:
            for item in value:
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    unknown += [f"{key}[].{u}" for u in from_json(item, target.add())]
                else:
                    target.append(item)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            unknown += [f"{key}.{u}" for u in from_json(value, target)]
        else:
            setattr(message, field.name, value)
    return unknown
