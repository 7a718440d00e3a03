"""OCI specs: the agent API's grpc.Spec and the runtime's config.json.

Shared by the agent (which writes config.json for the runtime), kata-agent-ctl
and container tracing (which build specs without hand-writing one).

The protobuf field names are Go-style (UIDMappings, OOMScoreAdj); config.json
uses lowerCamel (uidMappings, oomScoreAdj). Empty and zero values are left
out, as proto3 cannot tell them from unset.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from .api import oci_pb2

CAPABILITIES = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]


def default_config(
    rootfs: str, args: list[str] | None = None, terminal: bool = False
) -> dict[str, Any]:
    """A shell (or `args`) in `rootfs`, an absolute path on the agent's machine."""
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args or ["/bin/sh"],
            "env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "TERM=xterm",
            ],
            "cwd": "/",
            "capabilities": {k: CAPABILITIES for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs, "readonly": False},
        "hostname": "kata",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": [
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger",
            ],
        },
    }


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


@functools.cache
def _json_field(field: FieldDescriptor) -> tuple[str, FieldDescriptor | None]:
    """A field's JSON name and, for a map, its value field: worked out once per
    field (GetOptions builds a new options message each time it is asked)."""
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        return json_name(field.name), entry.fields_by_name["value"]
    return json_name(field.name), None


def to_json(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        name, map_value = _json_field(field)
        if map_value is not None:
            out[name] = {k: _value(map_value, v) for k, v in value.items()}
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


def to_spec(config: dict[str, Any]) -> oci_pb2.Spec:
    """The grpc.Spec for a config.json-style dict (keys it has no field for are ignored)."""
    spec = oci_pb2.Spec()
    from_json(config, spec)
    return spec
