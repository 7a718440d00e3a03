"""Auto values: the ids and fields a run of commands fills in unless told not to.

Ids are generated when a command creates something and remembered, so
`CreateContainer`, `StartContainer`, `WaitProcess` just work in sequence:

- CreateSandbox: sandbox_id (new). CreateContainer: container_id (new),
  exec_id (= container_id), OCI (from --bundle-dir).
- ExecProcess: container_id (remembered), exec_id (new), process (`/bin/sh`
  if none given).
- Other container and process calls: container_id (remembered), exec_id
  (the last exec started by ExecProcess, else the init process; `exec_id=`
  given empty means the init process).
- SetGuestDateTime: now. ReadStdout/ReadStderr: len 4096.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..api import agent_pb2
from ..vm import SHARE_TAG
from .api import CommandError, Method
from .spec import default_config, from_bundle, to_spec


def overlay(base: Any, given: Any) -> None:
    """Fields set in `given` replace those of `base` (repeated fields whole)."""
    for fd, value in given.ListFields():
        target = getattr(base, fd.name)
        if fd.is_repeated:  # lists and maps
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                target.clear()
                target.update(value)
            else:
                del target[:]
                target.extend(value)
        elif fd.message_type is not None:
            overlay(target, value)
        else:
            setattr(base, fd.name, value)


def new_id() -> str:
    return uuid.uuid4().hex


PROCESS_CALLS = {
    "SignalProcess",
    "WaitProcess",
    "WriteStdin",
    "ReadStdout",
    "ReadStderr",
    "CloseStdin",
    "TtyWinResize",
}


@dataclass
class AutoValues:
    bundle_dir: Path | None = None
    #: A rootfs path in the agent's machine (a guest image's own), used without a bundle.
    guest_rootfs: str | None = None
    #: Where the guest sees `bundle_dir` (shared over virtio-fs), if it is shared.
    guest_bundle: str | None = None
    sandbox_id: str = ""
    container_id: str = ""
    exec_id: str = ""
    #: Ids this run created, so the next run needs no clean-up of its own.
    created: list[str] = field(default_factory=list)

    def fill(self, method: Method, request: Any, given: frozenset[str] = frozenset()) -> None:
        """Fill in what was not `given` (`exec_id=`: the init process, not the last exec)."""
        fields = request.DESCRIPTOR.fields_by_name
        name = method.name
        if name == "CreateSandbox":
            if not request.sandbox_id:
                request.sandbox_id = new_id()
            self.sandbox_id = request.sandbox_id
            return
        if name == "CreateContainer":
            self._fill_create(request)
            return
        if name == "ExecProcess":
            if not request.container_id:
                request.container_id = self.container_id
            if not request.exec_id:
                request.exec_id = new_id()
            if not request.HasField("process"):
                request.process.Args.append("/bin/sh")
                request.process.Cwd = "/"
            self.exec_id = request.exec_id
            return
        if "container_id" in fields and not request.container_id and "container_id" not in given:
            request.container_id = self.container_id
        if name in PROCESS_CALLS and not request.exec_id and "exec_id" not in given:
            request.exec_id = self.exec_id
        if name in ("ReadStdout", "ReadStderr") and not request.len:
            request.len = 4096
        if name == "SetGuestDateTime" and not request.Sec:
            now = time.time()
            request.Sec, request.Usec = int(now), int(now % 1 * 1e6)

    def base_spec(self) -> Any:
        """The spec containers start from: the bundle's, or the guest rootfs' default; None."""
        if self.bundle_dir is not None:
            spec = from_bundle(self.bundle_dir)
            if self.guest_bundle is not None:
                spec.Root.Path = self._in_guest(spec.Root.Path)
            return spec
        if self.guest_rootfs is not None:
            return to_spec(default_config(self.guest_rootfs))
        return None

    def _in_guest(self, host_path: str) -> str:
        assert self.bundle_dir is not None and self.guest_bundle is not None
        try:
            relative = Path(host_path).relative_to(self.bundle_dir.resolve())
        except ValueError:
            raise CommandError(
                f"the bundle's rootfs {host_path} is outside --bundle-dir {self.bundle_dir}: "
                "only that directory is shared with the guest"
            ) from None
        return str(PurePosixPath(self.guest_bundle) / relative)

    def storages(self) -> list[agent_pb2.Storage]:
        """What a container needs mounted first: the shared bundle, if there is one."""
        if self.guest_bundle is None:
            return []
        return [
            agent_pb2.Storage(
                driver="virtio-fs", source=SHARE_TAG, fstype="virtiofs",
                mount_point=self.guest_bundle,
            )
        ]  # fmt: skip

    def _fill_create(self, request: Any) -> None:
        if not request.container_id:
            request.container_id = new_id()
        if not request.exec_id:
            request.exec_id = request.container_id
        spec = self.base_spec()
        if spec is not None:
            # The bundle's spec, with whatever OCI fields the command gave on top.
            overlay(spec, request.OCI)
            request.OCI.CopyFrom(spec)
        elif not request.HasField("OCI"):
            raise CommandError(
                "CreateContainer needs an OCI spec: give --bundle-dir (a bundle, or a "
                "rootfs), or OCI fields (json://, OCI.Root.Path=...)"
            )
        if not request.storages:
            request.storages.extend(self.storages())
        self.container_id = request.container_id
        self.exec_id = ""
        self.created.append(self.container_id)
