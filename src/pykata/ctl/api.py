"""The agent API as the control tool sees it: every method by name, and how to
build its request from `key=value` words, `json://...` or `file://...`.

Field paths (names as in the protos):

    container_id=c1                       a scalar field
    OCI.Process.Cwd=/tmp                  nested messages are created as needed
    OCI.Process.Args=/bin/ls OCI.Process.Args=-l
                                          a repeated field: each word appends
    OCI.Process.Args='["/bin/ls","-l"]'   ... or a JSON list sets it whole
    storages[0].driver=local              an element of a repeated message field
    OCI.Annotations[io.kata.x]=y          a map entry
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from ..api import agent_pb2, health_pb2


class CommandError(ValueError):
    """A command line that cannot become a request; the message says why."""


@dataclass(frozen=True)
class Method:
    service: str
    name: str
    request_type: type[Message]
    response_type: type[Message]


def _methods() -> dict[str, Method]:
    table: dict[str, Method] = {}
    for file, service in ((health_pb2, "Health"), (agent_pb2, "AgentService")):
        descriptor = file.DESCRIPTOR.services_by_name[service]
        for m in descriptor.methods:
            table[m.name] = Method(
                descriptor.full_name,
                m.name,
                message_factory.GetMessageClass(m.input_type),
                message_factory.GetMessageClass(m.output_type),
            )
    return table


METHODS = _methods()

_PART = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:\[(?P<index>[^\]]*)\])?(?:\.|$)")


def _parts(path: str) -> list[tuple[str, str | None]]:
    """`a.b[0].c[k.x]` -> [(a, None), (b, "0"), (c, "k.x")]; map keys may hold dots."""
    parts, offset = [], 0
    while offset < len(path):
        match = _PART.match(path, offset)
        if not match or match.end() == offset:
            raise CommandError(f"{path!r} is not a field path (at {path[offset:]!r})")
        parts.append((match.group("name"), match.group("index")))
        offset = match.end()
    if not parts:
        raise CommandError("empty field name")
    return parts


def field_names(descriptor: Any) -> list[str]:
    return [f.name for f in descriptor.fields]


def _field(descriptor: Any, name: str, path: str) -> Any:
    field = descriptor.fields_by_name.get(name)
    if field is None:
        raise CommandError(
            f"{descriptor.name} has no field {name!r} (in {path!r}); "
            f"its fields: {', '.join(field_names(descriptor)) or '(none)'}"
        )
    return field


def _is_map(field: Any) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _scalar(field: Any, text: str, path: str) -> Any:
    t = field.type
    try:
        if t == FieldDescriptor.TYPE_BOOL:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
            return float(text)
        if t == FieldDescriptor.TYPE_BYTES:
            return text.encode()
        if t == FieldDescriptor.TYPE_STRING:
            return text
        if t == FieldDescriptor.TYPE_ENUM:
            value = field.enum_type.values_by_name.get(text)
            return value.number if value is not None else int(text)
        return int(text, 0)
    except ValueError:
        kind = field.enum_type.name if t == FieldDescriptor.TYPE_ENUM else _type_name(field)
        raise CommandError(f"{path}: {text!r} is not a valid {kind}") from None


def _type_name(field: Any) -> str:
    if field.message_type is not None:
        return str(field.message_type.name)
    if field.enum_type is not None:
        return str(field.enum_type.name)
    names = {v: k for k, v in vars(FieldDescriptor).items() if k.startswith("TYPE_")}
    return names.get(field.type, "?").removeprefix("TYPE_").lower()


def describe(field: Any) -> str:
    """`repeated string`, `map<string, string>`, `Spec`..."""
    if _is_map(field):
        key, value = (
            field.message_type.fields_by_name["key"],
            field.message_type.fields_by_name["value"],
        )
        return f"map<{_type_name(key)}, {_type_name(value)}>"
    return ("repeated " if field.is_repeated else "") + _type_name(field)


def assign(request: Message, path: str, text: str) -> None:
    """Set one `path=text` word on `request`."""
    target: Message = request
    parts = _parts(path)
    for i, (name, index) in enumerate(parts):
        field = _field(target.DESCRIPTOR, name, path)
        last = i == len(parts) - 1
        container = getattr(target, name)
        if _is_map(field):
            if index is None:
                raise CommandError(f"{path}: {name} is a map: write {name}[KEY]=VALUE")
            value_field = field.message_type.fields_by_name["value"]
            if value_field.message_type is None:
                if not last:
                    raise CommandError(f"{path}: map {name} holds {describe(value_field)}")
                container[index] = _scalar(value_field, text, path)
                return
            target = container[index]
            continue
        if field.is_repeated:
            if index is None:
                if not last:
                    raise CommandError(f"{path}: {name} is repeated: write {name}[N].field")
                _set_repeated(field, container, text, path)
                return
            if not index.isdigit():
                raise CommandError(f"{path}: [{index}] must be a number")
            position = int(index)
            if field.message_type is None:
                while len(container) <= position:
                    container.append(
                        _scalar(
                            field, "0" if field.type != FieldDescriptor.TYPE_STRING else "", path
                        )
                    )
                container[position] = _scalar(field, text, path)
                return
            while len(container) <= position:
                container.add()
            target = container[position]
            continue
        if field.message_type is not None:
            if last:
                _set_json(container, text, path)
                return
            target = container
            continue
        if not last:
            raise CommandError(f"{path}: {name} is a {describe(field)}, it has no fields")
        setattr(target, name, _scalar(field, text, path))
    return


def _set_repeated(field: Any, container: Any, text: str, path: str) -> None:
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise CommandError(f"{path}: not a JSON list: {exc}") from None
        del container[:]
        for item in items:
            if field.message_type is not None:
                json_format.ParseDict(item, container.add())
            else:
                container.append(
                    _scalar(field, item if isinstance(item, str) else json.dumps(item), path)
                )
        return
    if field.message_type is not None:
        _set_json(container.add(), text, path)
    else:
        container.append(_scalar(field, text, path))


def _set_json(message: Message, text: str, path: str) -> None:
    try:
        json_format.Parse(text, message)
    except json_format.ParseError as exc:
        raise CommandError(f"{path}: {exc}") from None


def request_from_json(method: Method, text: str, source: str) -> Message:
    request = method.request_type()
    try:
        json_format.Parse(text or "{}", request)
    except json_format.ParseError as exc:
        raise CommandError(f"{method.name} {source}: {exc}") from None
    return request


def load_json_arg(arg: str) -> tuple[str, str]:
    """`json://{...}` or `file:///path.json` -> (the JSON text, where it came from)."""
    if arg.startswith("json://"):
        return arg[len("json://") :], "json://"
    path = arg[len("file://") :]
    try:
        return Path(path).read_text(), arg
    except OSError as exc:
        raise CommandError(f"cannot read {arg}: {exc.strerror}") from None


def build_request(method: Method, words: list[str]) -> Message:
    """The request from a command's words (after its name)."""
    request = method.request_type()
    for word in words:
        if word.startswith(("json://", "file://")):
            text, source = load_json_arg(word)
            request.MergeFrom(request_from_json(method, text, source))
            continue
        key, eq, value = word.partition("=")
        if not eq:
            raise CommandError(
                f"{method.name}: {word!r} is not key=value, json://... or file://...; "
                f"fields: {', '.join(field_names(method.request_type.DESCRIPTOR)) or '(none)'}"
            )
        assign(request, key, value)
    return request
