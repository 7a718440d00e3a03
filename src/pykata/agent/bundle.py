"""The runtime's input: a request's spec shaped the way the agent runs every container.

All of it in one place: what must be there (a command, an absolute rootfs),
the defaults, what is dropped (hooks), and what the sandbox decides (the
cgroup, the namespaces, the DNS file) - for a container's config.json and
for an exec's process.json.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidArgument

log = logging.getLogger("pykata.agent.bundle")

OCI_VERSION = "1.0.2"
RESOLV_CONF = "/etc/resolv.conf"


@dataclass(frozen=True)
class Placement:
    """What the sandbox decides for a container."""

    cgroups_path: str
    #: The PID namespace entry: {"type": "pid"} (a new one) or the sandbox's by path.
    pid_namespace: dict[str, str]
    #: OCI namespace type -> the path of the sandbox's (uts, ipc, network), or None
    #: for the agent's own (a guest's network); empty without a sandbox.
    shared_namespaces: dict[str, str | None] = field(default_factory=dict)
    #: The sandbox's resolv.conf, bind-mounted unless the spec mounts one.
    resolv_conf: Path | None = None


def container_config(container_id: str, spec: dict[str, Any], place: Placement) -> dict[str, Any]:
    """The bundle's config.json from a request's spec (taken over and edited)."""
    config = spec
    config["process"] = process_spec(config.get("process") or {}, "OCI.Process")
    root = (config.get("root") or {}).get("path", "")
    if not root or not os.path.isabs(root):
        raise InvalidArgument(f"OCI.Root.Path {root!r} must be an absolute path to the rootfs")
    if not os.path.isdir(root):
        raise InvalidArgument(f"OCI.Root.Path {root!r} is not a directory")
    config.setdefault("ociVersion", OCI_VERSION)
    if config.pop("hooks", None):
        # Hooks in the request are the host's; run in the guest they would run
        # host-side programs with the agent's privileges.
        log.warning("ignoring OCI hooks in the spec of container %s", container_id)
    linux = config.setdefault("linux", {})
    linux["cgroupsPath"] = place.cgroups_path
    linux["namespaces"] = _namespaces(linux.get("namespaces") or [], place)
    if place.shared_namespaces:
        config.pop("hostname", None)  # the sandbox's hostname applies
    if place.resolv_conf is not None:
        mounts = config.setdefault("mounts", [])
        if not any(m.get("destination") == RESOLV_CONF for m in mounts):
            mounts.append(
                {
                    "destination": RESOLV_CONF,
                    "type": "bind",
                    "source": str(place.resolv_conf),
                    "options": ["rbind", "ro"],
                }
            )
    return config


def _namespaces(requested: list[dict[str, Any]], place: Placement) -> list[dict[str, Any]]:
    """The spec's namespaces, with the PID namespace and the sandbox's shared ones
    always the agent's choice (a path in the spec is never joined for those)."""
    replaced = {"pid", *place.shared_namespaces}
    kept = [ns for ns in requested if ns.get("type") not in replaced]
    shared = [
        {"type": kind, "path": path} for kind, path in place.shared_namespaces.items() if path
    ]
    return [*kept, *shared, place.pid_namespace]


def process_spec(process: dict[str, Any], what: str) -> dict[str, Any]:
    """A process as the runtime gets it: a command, and the defaults upstream fills in."""
    if not process.get("args"):
        raise InvalidArgument(f"{what}.Args is empty: a process needs a command to run")
    process = dict(process)
    process.setdefault("cwd", "/")
    process.setdefault("user", {"uid": 0, "gid": 0})
    return process
