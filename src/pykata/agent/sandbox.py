"""The sandbox: every container the agent runs, and what they share.

A sandbox created with CreateSandbox gets UTS, IPC and network namespaces
of its own (held open by a small holder process) that its containers join,
so its hostname and network never touch the host's (when the agent owns the
machine, the network is the guest's own); its DNS settings become a
resolv.conf file bind-mounted into each container. Without CreateSandbox, containers
still run, each with the namespaces its spec asks for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import cgroups, leftovers
from .container import Container
from .errors import (
    AlreadyExists,
    ContainerNotFound,
    FailedPrecondition,
    InvalidArgument,
    Unsupported,
)
from .ids import check_id
from .oom import OomEvents
from .reaper import orphans
from .runtime import OciRuntime
from .storage import Storages, StorageSpec

log = logging.getLogger("pykata.agent.sandbox")

CGROUP_ROOT = "/pykata"
#: OCI namespace type -> its name under /proc/<pid>/ns.
SHARED_NAMESPACES = {"uts": "uts", "ipc": "ipc", "network": "net"}


@dataclass
class SandboxSettings:
    sandbox_id: str = ""
    hostname: str = ""
    dns: list[str] = field(default_factory=list)
    sandbox_pidns: bool = False
    guest_hook_path: str = ""
    kernel_modules: list[tuple[str, list[str]]] = field(default_factory=list)
    storages: list[StorageSpec] = field(default_factory=list)


class Sandbox:
    def __init__(
        self, runtime: OciRuntime, run_dir: Path, *, pipe_size: int = 0, owns_machine: bool = False
    ) -> None:
        self.runtime = runtime
        self.run_dir = run_dir
        self.pipe_size = pipe_size
        self.owns_machine = owns_machine
        self.settings: SandboxSettings | None = None
        self.containers: dict[str, Container] = {}
        self._holder: asyncio.subprocess.Process | None = None
        self.storages = Storages(run_dir, owns_machine)
        self.oom = OomEvents()
        self._storage_points: list[Path] = []
        self._instance = f"agent-{os.getpid()}"
        #: The PID namespace containers created with sandbox_pidns share, and its container.
        self._pidns: str | None = None
        self._pidns_holder = ""

    # --- the sandbox itself ---------------------------------------------------

    @property
    def dir(self) -> Path:
        return self.run_dir / "sandbox"

    @property
    def cgroup_parent(self) -> str:
        return f"{CGROUP_ROOT}/{self._instance}"

    async def create(self, settings: SandboxSettings) -> None:
        if self.settings is not None:
            if self.containers:
                raise AlreadyExists(
                    f"sandbox {self.settings.sandbox_id or '(unnamed)'} already exists with "
                    f"containers {', '.join(sorted(self.containers))}; DestroySandbox first"
                )
            # An empty sandbox is simply replaced, as upstream's agent does: several
            # runs one after another need no clean-up between them.
            log.info("replacing empty sandbox", extra={"sandbox": self.settings.sandbox_id})
            await self.destroy()
        if settings.sandbox_id:
            check_id("sandbox_id", settings.sandbox_id)
        if settings.guest_hook_path:
            raise Unsupported(
                f"guest hooks (guest_hook_path {settings.guest_hook_path!r}) are not supported yet"
            )
        for storage in settings.storages:
            self.storages.check(storage)
        if settings.kernel_modules:
            await self._load_modules(settings.kernel_modules)
        self.dir.mkdir(parents=True, exist_ok=True)
        if settings.dns:
            (self.dir / "resolv.conf").write_text("".join(f"{line}\n" for line in settings.dns))
        if settings.hostname and len(settings.hostname) > 64:
            raise InvalidArgument(f"hostname {settings.hostname!r} is longer than 64 characters")
        self._storage_points = await self._mount_all(settings.storages)
        try:
            self._holder = await self._start_holder(settings.hostname)
        except BaseException:
            for point in self._storage_points:
                await self.storages.release(point)
            raise
        if settings.sandbox_id:
            self._instance = settings.sandbox_id
        self.settings = settings
        log.info(
            "sandbox created", extra={"sandbox": settings.sandbox_id, "hostname": settings.hostname}
        )

    async def _load_modules(self, modules: list[tuple[str, list[str]]]) -> None:
        if not self.owns_machine:
            names = ", ".join(name for name, _ in modules)
            raise FailedPrecondition(
                f"not loading kernel modules ({names}): the agent runs stand-alone on a host "
                "and loading them would change the host"
            )
        for name, params in modules:
            proc = await asyncio.create_subprocess_exec(
                "modprobe", name, *params, stderr=asyncio.subprocess.PIPE
            )
            _, err = await proc.communicate()
            if proc.returncode:
                raise FailedPrecondition(f"modprobe {name} failed: {err.decode().strip()}")

    @property
    def netns_path(self) -> str | None:
        """The sandbox's network namespace: None for the agent's own (it owns the machine)."""
        if self.owns_machine:
            return None
        if self._holder is None:
            raise FailedPrecondition(
                "no sandbox network yet: CreateSandbox first (stand-alone, the agent "
                "configures only the sandbox's own network namespace, never the host's)"
            )
        return f"/proc/{self._holder.pid}/ns/net"

    async def _start_holder(self, hostname: str) -> asyncio.subprocess.Process:
        """A process sitting in the sandbox's own UTS, IPC (and network) namespaces."""
        script = (
            'if [ -n "$1" ]; then hostname -- "$1" || exit 1; fi; '
            'if [ "$2" = net ]; then ip link set lo up || exit 1; fi; '
            "echo ready; exec sleep infinity"
        )
        network = [] if self.owns_machine else ["--net"]
        holder = await asyncio.create_subprocess_exec(
            "unshare",
            "--uts",
            "--ipc",
            *network,
            "--",
            "sh",
            "-c",
            script,
            "holder",
            hostname,
            "net" if network else "",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        orphans.kept.add(holder.pid)  # asyncio reaps it, not the sweeper
        leftovers.record_holder(self.dir, holder.pid)  # for an agent after us, if we die
        assert holder.stdout is not None
        line = await holder.stdout.readline()
        if line.strip() != b"ready":
            _, err = await holder.communicate()
            raise FailedPrecondition(
                f"cannot create the sandbox namespaces: {err.decode().strip()}"
            )
        return holder

    async def destroy(self) -> None:
        """Remove every container and everything the sandbox created."""
        for container_id in list(self.containers):
            try:
                await self.remove_container(container_id, timeout=10)
            except Exception as exc:
                log.error("cannot remove container %s: %s", container_id, exc)
        if self._holder is not None:
            with contextlib.suppress(ProcessLookupError):
                self._holder.kill()
            await self._holder.wait()
            orphans.kept.discard(self._holder.pid)
            self._holder = None
        for point in self._storage_points:
            await self.storages.release(point)
        self._storage_points = []
        shutil.rmtree(self.dir, ignore_errors=True)
        cgroups.remove(self.cgroup_parent, stop_at=CGROUP_ROOT)
        self.oom.close()
        self.settings = None
        self._pidns = None
        self._instance = f"agent-{os.getpid()}"

    # --- containers ------------------------------------------------------------

    def container(self, container_id: str) -> Container:
        found = self.containers.get(check_id("container_id", container_id))
        if found is None:
            raise ContainerNotFound(f"no container {container_id!r}")
        return found

    def _config(
        self, container_id: str, spec: dict[str, Any], sandbox_pidns: bool
    ) -> dict[str, Any]:
        """The bundle's config.json from a request's spec (which it takes over and edits)."""
        config = spec
        process = config.get("process") or {}
        if not process.get("args"):
            raise InvalidArgument("OCI.Process.Args is empty: a container needs a command to run")
        root = (config.get("root") or {}).get("path", "")
        if not root or not os.path.isabs(root):
            raise InvalidArgument(f"OCI.Root.Path {root!r} must be an absolute path to the rootfs")
        if not os.path.isdir(root):
            raise InvalidArgument(f"OCI.Root.Path {root!r} is not a directory")
        process.setdefault("cwd", "/")
        process.setdefault("user", {"uid": 0, "gid": 0})
        config.setdefault("ociVersion", "1.0.2")
        if config.pop("hooks", None):
            # Hooks in the request are the host's; run in the guest they would run
            # host-side programs with the agent's privileges.
            log.warning("ignoring OCI hooks in the spec of container %s", container_id)
        linux = config.setdefault("linux", {})
        linux["cgroupsPath"] = f"{self.cgroup_parent}/{container_id}"
        linux["namespaces"] = [
            *(ns for ns in linux.get("namespaces", []) if ns.get("type") != "pid"),
            self._pid_namespace(sandbox_pidns),
        ]
        if self._holder is not None:
            self._join_sandbox_namespaces(config)
        if self.settings and self.settings.dns:
            mounts = config.setdefault("mounts", [])
            if not any(m.get("destination") == "/etc/resolv.conf" for m in mounts):
                mounts.append(
                    {
                        "destination": "/etc/resolv.conf",
                        "type": "bind",
                        "source": str(self.dir / "resolv.conf"),
                        "options": ["rbind", "ro"],
                    }
                )
        return config

    def _pid_namespace(self, shared: bool) -> dict[str, str]:
        """A new PID namespace, or with `shared` the sandbox's (rpc.rs:2143-2165).

        The runtime strips the PID namespace from every spec; a container must
        never land in the agent's, where it could see and kill the agent. A PID
        namespace asked for by path in the spec is not honoured either.
        """
        shared = shared or bool(self.settings and self.settings.sandbox_pidns)
        if not shared:
            return {"type": "pid"}
        if self._pidns is not None:
            return {"type": "pid", "path": self._pidns}
        if self.containers:
            raise FailedPrecondition(
                "sandbox_pidns: the sandbox has no shared PID namespace any more "
                "(the container whose init held it is gone)"
            )
        return {"type": "pid"}  # the first container's becomes the sandbox's

    def _join_sandbox_namespaces(self, config: dict[str, Any]) -> None:
        assert self._holder is not None
        namespaces = [
            ns
            for ns in config["linux"].get("namespaces", [])
            if ns.get("type") not in SHARED_NAMESPACES
        ]
        for kind, name in SHARED_NAMESPACES.items():
            if kind == "network" and self.owns_machine:
                continue  # the guest's own network: the container stays in the agent's
            namespaces.append({"type": kind, "path": f"/proc/{self._holder.pid}/ns/{name}"})
        config["linux"]["namespaces"] = namespaces
        config.pop("hostname", None)  # the sandbox's hostname applies

    async def _mount_all(self, storages: list[StorageSpec]) -> list[Path]:
        points: list[Path] = []
        try:
            for storage in storages:
                points.append(await self.storages.add(storage))
        except BaseException:
            for point in points:
                await self.storages.release(point)
            raise
        return points

    async def create_container(
        self,
        container_id: str,
        spec: dict[str, Any],
        storages: Sequence[StorageSpec] = (),
        init_exec_id: str = "",
        sandbox_pidns: bool = False,
    ) -> Container:
        """`init_exec_id`: the id the runtime gives the init process ("" names it too);
        `sandbox_pidns`: share the sandbox's PID namespace instead of a new one."""
        check_id("container_id", container_id)
        check_id("exec_id", init_exec_id, may_be_empty=True)
        if container_id in self.containers:
            raise AlreadyExists(f"container {container_id!r} already exists")
        for storage in storages:
            self.storages.check(storage)
        points = await self._mount_all(list(storages))
        try:
            container = await self._create_container(container_id, spec, sandbox_pidns)
        except BaseException:
            for point in points:
                await self.storages.release(point)
            raise
        container.storage_points = points
        container.init_exec_id = init_exec_id
        self.oom.watch(container_id, container.cgroup)
        return container

    async def _create_container(
        self, container_id: str, spec: dict[str, Any], sandbox_pidns: bool
    ) -> Container:
        config = self._config(container_id, spec, sandbox_pidns)
        first = not self.containers
        bundle = self.run_dir / "containers" / container_id
        bundle.mkdir(parents=True, exist_ok=False)
        container = Container(container_id, bundle, config, self.runtime, self.pipe_size)
        self.containers[container_id] = container
        try:
            await container.create()
        except BaseException:
            self.containers.pop(container_id, None)
            with contextlib.suppress(Exception):
                await self.runtime.delete(container_id, force=True)
            shutil.rmtree(bundle, ignore_errors=True)
            cgroups.remove(container.cgroup, stop_at=container.cgroup)
            raise
        if first and self._pidns is None:
            # The first container is the sandbox's infra container (sandbox.rs:268-290).
            assert container.init is not None
            self._pidns = f"/proc/{container.init.pid}/ns/pid"
            self._pidns_holder = container_id
        log.info("container created", extra={"container": container_id})
        return container

    async def remove_container(self, container_id: str, timeout: float | None) -> None:
        container = self.container(container_id)
        await container.remove(timeout)
        self.containers.pop(container_id, None)
        self.oom.forget(container_id)
        if container_id == self._pidns_holder:
            self._pidns, self._pidns_holder = None, ""  # the namespace ended with its init
        # Only the container's own: the sandbox's parent cgroup stays until the sandbox
        # goes (creating and removing cgroups costs milliseconds each).
        cgroups.remove(container.cgroup, stop_at=container.cgroup)
        for point in container.storage_points:
            await self.storages.release(point)
        log.info("container removed", extra={"container": container_id})
