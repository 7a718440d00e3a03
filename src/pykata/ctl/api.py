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

Values: a bytes field takes printf's escapes (`data='hello\\n'`) or, as
upstream's tool, `hex:68690a`; a `signal` field takes a number or a name as
upstream's tool does (`KILL`, `SIGTERM`, `usr1`); upstream's `cid=` and
`sid=` stand for `container_id=` and `sandbox_id=`.
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
from .words import c_escapes


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


#: Upstream kata-agent-ctl's signal names (src/tools/agent-ctl/src/utils.rs), numbered
#: as on Linux: SIGHUP is 1 ... SIGSYS is 31, and SIGCLD is SIGCHLD.
_SIGNAL_NAMES = (
    "HUP INT QUIT ILL TRAP ABRT BUS FPE KILL USR1 SEGV USR2 PIPE ALRM TERM STKFLT CHLD CONT "
    "STOP TSTP TTIN TTOU URG XCPU XFSZ VTALRM PROF WINCH IO PWR SYS"
)
SIGNALS = {f"SIG{name}": n for n, name in enumerate(_SIGNAL_NAMES.split(" "), 1)} | {"SIGCLD": 17}

#: Upstream kata-agent-ctl's short option names.
ALIASES = {"cid": "container_id", "sid": "sandbox_id"}

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_SINT32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_UINT32: (0, (1 << 32) - 1),
    FieldDescriptor.TYPE_FIXED32: (0, (1 << 32) - 1),
    FieldDescriptor.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_SINT64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_UINT64: (0, (1 << 64) - 1),
    FieldDescriptor.TYPE_FIXED64: (0, (1 << 64) - 1),
}


def signal_number(text: str) -> int:
    """`9`, `KILL`, `SIGKILL`, `kill` -> 9, as upstream's tool reads a signal."""
    if text.isdigit():
        return int(text)
    name = text.upper()
    number = SIGNALS.get(name if name.startswith("SIG") else f"SIG{name}")
    if number is None:
        raise ValueError(text)
    return number


def bytes_value(text: str) -> bytes:
    """A bytes field's value: `hex:...` (upstream's form), else the text with C escapes."""
    if text.startswith("hex:"):
        return bytes.fromhex(text[4:])
    return c_escapes(text).encode("utf-8", "surrogateescape")


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
            return bytes_value(text)
        if t == FieldDescriptor.TYPE_STRING:
            text.encode()  # a $'\xff' byte is not UTF-8: say so here
            return text
        if t == FieldDescriptor.TYPE_ENUM:
            value = field.enum_type.values_by_name.get(text)
            return value.number if value is not None else int(text)
        number = signal_number(text) if field.name == "signal" else int(text, 0)
        low, high = _INT_RANGES.get(t, (number, number))
        if not low <= number <= high:
            raise CommandError(f"{path}: {text} is out of range for a {_type_name(field)}")
        return number
    except UnicodeEncodeError:
        raise CommandError(f"{path}: a string must be UTF-8, not raw bytes") from None
    except ValueError as exc:
        if isinstance(exc, CommandError):
            raise
        kind = field.enum_type.name if t == FieldDescriptor.TYPE_ENUM else _type_name(field)
        if field.name == "signal":
            kind = "signal (a number, or a name such as KILL, SIGTERM, usr1)"
        if t == FieldDescriptor.TYPE_BYTES:
            kind = "hex: value (hex:68690a)"
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
        if not isinstance(items, list):
            raise CommandError(f"{path}: not a JSON list")
        del container[:]
        for item in items:
            if field.message_type is not None:
                _parse_json_into(container.add(), item, path)
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
        data = json.loads(text)
    except ValueError as exc:
        raise CommandError(
            f"{path}: a {message.DESCRIPTOR.name} is given as JSON, and this is not JSON "
            f"({exc}); quote it whole: {path}='{{...}}'"
        ) from None
    _parse_json_into(message, data, path)


def _parse_json_into(message: Message, data: Any, path: str) -> None:
    _check_json_fields(message.DESCRIPTOR, data, path)
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as exc:
        raise CommandError(f"{path}: {exc}") from None


def request_from_json(method: Method, text: str, source: str) -> Message:
    request = method.request_type()
    try:
        data = json.loads(text or "{}")
    except ValueError as exc:
        raise CommandError(f"{method.name} {source}: not JSON: {exc}") from None
    _check_json_fields(request.DESCRIPTOR, data, "")
    try:
        json_format.ParseDict(data, request)
    except json_format.ParseError as exc:
        raise CommandError(f"{method.name} {source}: {exc}") from None
    return request


def _check_json_fields(descriptor: Any, data: Any, path: str) -> None:
    """A key no field has is refused as `key=value` refuses it: in the protos' names."""
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        field = descriptor.fields_by_name.get(key) or next(
            (f for f in descriptor.fields if f.json_name == key), None
        )
        where = f"{path}.{key}" if path else key
        if field is None:
            raise CommandError(
                f"{descriptor.name} has no field {key!r} (in {where!r}); "
                f"its fields: {', '.join(field_names(descriptor)) or '(none)'}"
            )
        if field.message_type is None or field.message_type.full_name.startswith("google."):
            continue
        if _is_map(field):
            value_field = field.message_type.fields_by_name["value"]
            if value_field.message_type is not None and isinstance(value, dict):
                for k, v in value.items():
                    _check_json_fields(value_field.message_type, v, f"{where}[{k}]")
        elif field.is_repeated and isinstance(value, list):
            for n, item in enumerate(value):
                _check_json_fields(field.message_type, item, f"{where}[{n}]")
        else:
            _check_json_fields(field.message_type, value, where)


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
    return build(method, words)[0]


def build(method: Method, words: list[str]) -> tuple[Message, set[str]]:
    """The request from a command's words, and the names of the fields they gave
    (`exec_id=` gives exec_id, empty: auto values leave what was given alone)."""
    request = method.request_type()
    given: set[str] = set()
    for word in words:
        if word.startswith(("json://", "file://")):
            text, source = load_json_arg(word)
            part = request_from_json(method, text, source)
            request.MergeFrom(part)
            given |= {f.name for f, _ in part.ListFields()} | _json_keys(part, text)
            continue
        key, eq, value = word.partition("=")
        if not eq:
            raise CommandError(
                f"{method.name}: {word!r} is not key=value, json://... or file://...; "
                f"fields: {', '.join(field_names(method.request_type.DESCRIPTOR)) or '(none)'}"
            )
        if key in ALIASES:
            if ALIASES[key] not in request.DESCRIPTOR.fields_by_name:
                continue  # upstream's tool also takes sid= where no sandbox id goes
            key = ALIASES[key]
        assign(request, key, value)
        given.add(_parts(key)[0][0])
    return request, given


def _json_keys(request: Message, text: str) -> set[str]:
    """Top-level fields a JSON request names, empty values included."""
    data = json.loads(text or "{}")
    by_json: dict[str, str] = {f.json_name: f.name for f in request.DESCRIPTOR.fields}
    return {by_json.get(str(k), str(k)) for k in data} if isinstance(data, dict) else set()
