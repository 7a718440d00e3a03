"""OCI specs for CreateContainer without hand-writing one.

From `--bundle-dir`: its config.json, with the rootfs path made absolute;
or, if the bundle has a rootfs but no config.json (or only a rootfs
directory is given), a sensible default: a shell in the rootfs with the
usual namespaces, /proc, /dev and /sys mounted, default capabilities.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..agent import oci
from ..api import oci_pb2
from .api import CommandError

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


def from_bundle(bundle: Path) -> oci_pb2.Spec:
    """The spec for a bundle directory (config.json, or a default for its rootfs)."""
    config_file = bundle / "config.json"
    if config_file.exists():
        try:
            config = json.loads(config_file.read_text())
        except ValueError as exc:
            raise CommandError(f"{config_file} is not valid JSON: {exc}") from None
        root = Path(config.get("root", {}).get("path", "rootfs"))
        config.setdefault("root", {})["path"] = str((bundle / root).resolve())
    elif (bundle / "rootfs").is_dir():
        config = default_config(str((bundle / "rootfs").resolve()))
    elif (bundle / "bin").is_dir():  # the directory is itself a rootfs
        config = default_config(str(bundle.resolve()))
    else:
        raise CommandError(f"{bundle} has neither config.json nor a rootfs directory")
    return to_spec(config)


def to_spec(config: dict[str, Any]) -> oci_pb2.Spec:
    spec = oci_pb2.Spec()
    oci.from_json(config, spec)
    return spec
