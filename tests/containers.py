"""Real containers for the tests: a busybox-static rootfs and OCI specs for it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from pykata import ocispec
from pykata.api import oci_pb2

BUSYBOX = "/bin/busybox"


def build_rootfs(path: Path) -> Path:
    """A minimal root filesystem: busybox-static and its applet links, passwd, group."""
    (path / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, path / "bin" / "busybox")
    applets = subprocess.run(
        [BUSYBOX, "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet == "bin/busybox":
            continue
        link = path / applet
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink("/bin/busybox", link)
    for d in ("etc", "proc", "sys", "dev", "tmp", "root"):
        (path / d).mkdir(exist_ok=True)
    (path / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (path / "etc" / "group").write_text("root:x:0:\n")
    (path / "etc" / "hostname").write_text("busybox\n")
    return path


def template() -> dict[str, Any]:
    """The runtime's own default spec (`runc spec`)."""
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"pykata-spec-{os.getpid()}"
    workdir.mkdir(exist_ok=True)
    subprocess.run(["runc", "spec"], cwd=workdir, check=True)
    data: dict[str, Any] = json.loads((workdir / "config.json").read_text())
    shutil.rmtree(workdir)
    return data


_TEMPLATE: dict[str, Any] | None = None


def spec(rootfs: Path, *args: str, terminal: bool = False, **process: Any) -> oci_pb2.Spec:
    global _TEMPLATE
    if _TEMPLATE is None:
        _TEMPLATE = template()
    config = json.loads(json.dumps(_TEMPLATE))
    config["root"] = {"path": str(rootfs), "readonly": False}
    config["process"]["args"] = list(args)
    config["process"]["terminal"] = terminal
    config["process"].update(process)
    message = oci_pb2.Spec()
    unknown = ocispec.from_json(config, message)
    assert not unknown, unknown
    return message


def process(*args: str, terminal: bool = False) -> oci_pb2.Process:
    return oci_pb2.Process(
        Args=list(args), Terminal=terminal, Cwd="/", Env=["PATH=/bin:/sbin:/usr/bin:/usr/sbin"]
    )


def as_the_kata_runtime_sends(message: oci_pb2.Spec) -> oci_pb2.Spec:
    """The spec after the Kata runtime's own changes (kata_agent.go `handlePidNamespace`
    and `constrainGRPCSpec`): no PID, network, cgroup or time namespace, no paths in
    the others, no hooks, no device/pids/blkio/network resources, no cpuset."""
    kept = [
        ns for ns in message.Linux.Namespaces if ns.Type not in ("pid", "network", "cgroup", "time")
    ]
    del message.Linux.Namespaces[:]
    for ns in kept:
        message.Linux.Namespaces.add(Type=ns.Type)
    message.ClearField("Hooks")
    resources = message.Linux.Resources
    for name in ("Devices", "Pids", "BlockIO", "Network"):
        resources.ClearField(name)
    resources.CPU.Cpus = ""
    resources.CPU.Mems = ""
    return message


def leftovers(instance: str, run_dir: Path) -> list[str]:
    """Everything an agent may leave behind: processes, cgroups, bundles."""
    found = []
    for name in ("memory", "pids", "freezer", "cpu"):
        base = Path("/sys/fs/cgroup") / name / "pykata" / instance
        if base.exists():
            found += [str(base), *(str(p) for p in base.rglob("*") if p.is_dir())]
    containers = run_dir / "containers"
    if containers.exists():
        found += [str(p) for p in containers.iterdir()]
    # processes of its containers, wherever they were reparented to
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cgroup = (proc / "cgroup").read_text()
            except OSError:
                continue
            if f"/pykata/{instance}/" in cgroup:
                found.append(f"process {proc.name}")
    return found
