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

from . import bundle, cgroups, leftovers
from .command import run
from .container import Container
from .errors import (
    AlreadyExists,
    ContainerNotFound,
    FailedPrecondition,
    InvalidArgument,
    Unsupported,
)
from .ids import check_id
from .network import Network
from .oom import OomEvents
from .process import Process
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
        #: In a guest the sandbox's network is the agent's own; stand-alone, the holder's.
        self._network: Network | None = Network(None) if owns_machine else None
        self.storages = Storages(run_dir, owns_machine)
        self.oom = OomEvents()
        #: Undoes, in reverse, what CreateSandbox did (storages, holder, files).
        self._undo = contextlib.AsyncExitStack()
        self._instance = f"agent-{os.getpid()}"
        #: The PID namespace containers created with sandbox_pidns share.
        self._pidns: str | None = None

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
        if settings.hostname and len(settings.hostname) > 64:
            raise InvalidArgument(f"hostname {settings.hostname!r} is longer than 64 characters")
        if settings.kernel_modules:
            await self._load_modules(settings.kernel_modules)
        undo = self._undo = contextlib.AsyncExitStack()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            undo.callback(shutil.rmtree, self.dir, ignore_errors=True)
            if settings.dns:
                resolv = "".join(f"{line}\n" for line in settings.dns)
                (self.dir / "resolv.conf").write_text(resolv)
            for storage in settings.storages:
                undo.push_async_callback(self.storages.release, await self.storages.add(storage))
            await self._start_holder(settings.hostname)
        except BaseException:
            await undo.aclose()
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
            await run("modprobe", name, *params)

    @property
    def network(self) -> Network:
        """The sandbox's network: the guest's own when the agent owns the machine."""
        if self._network is None:
            raise FailedPrecondition(
                "no sandbox network yet: CreateSandbox first (stand-alone, the agent "
                "configures only the sandbox's own network namespace, never the host's)"
            )
        return self._network

    async def _start_holder(self, hostname: str) -> None:
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
        self._holder = holder
        self._undo.push_async_callback(self._stop_holder)
        leftovers.record_holder(self.dir, holder.pid)  # for an agent after us, if we die
        assert holder.stdout is not None
        line = await holder.stdout.readline()
        if line.strip() != b"ready":
            _, err = await holder.communicate()
            raise FailedPrecondition(
                f"cannot create the sandbox namespaces: {err.decode().strip()}"
            )
        if not self.owns_machine:
            self._network = Network(f"/proc/{holder.pid}/ns/net")

    async def _stop_holder(self) -> None:
        holder, self._holder = self._holder, None
        assert holder is not None
        with contextlib.suppress(ProcessLookupError):  # it is gone already
            holder.kill()
        await holder.wait()
        orphans.kept.discard(holder.pid)
        if not self.owns_machine:
            self._network = None

    async def destroy(self) -> None:
        """Remove every container and everything the sandbox created."""
        for container_id in list(self.containers):
            try:
                await self.remove_container(container_id, timeout=10)
            except Exception as exc:
                log.error("cannot remove container %s: %s", container_id, exc)
        await self._undo.aclose()
        cgroups.remove(self.cgroup_parent, stop_at=CGROUP_ROOT)
        self.oom.close()
        self.settings = None
        self._pidns = None
        self._instance = f"agent-{os.getpid()}"

    async def runtime_supports_seccomp(self) -> bool:
        return await self.runtime.supports_seccomp()

    # --- containers ------------------------------------------------------------

    def container(self, container_id: str) -> Container:
        found = self.containers.get(check_id("container_id", container_id))
        if found is None:
            raise ContainerNotFound(f"no container {container_id!r}")
        return found

    def _placement(self, container_id: str, sandbox_pidns: bool) -> bundle.Placement:
        shared: dict[str, str | None] = {}
        if self._holder is not None:
            for kind, name in SHARED_NAMESPACES.items():
                # In a guest the sandbox's network is the agent's own.
                own = kind == "network" and self.owns_machine
                shared[kind] = None if own else f"/proc/{self._holder.pid}/ns/{name}"
        dns = self.settings is not None and bool(self.settings.dns)
        return bundle.Placement(
            cgroups_path=f"{self.cgroup_parent}/{container_id}",
            pid_namespace=self._pid_namespace(sandbox_pidns),
            shared_namespaces=shared,
            resolv_conf=self.dir / "resolv.conf" if dns else None,
        )

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

    async def create_container(
        self,
        container_id: str,
        init_exec_id: str,
        spec: dict[str, Any],
        storages: Sequence[StorageSpec] = (),
        *,
        sandbox_pidns: bool = False,
    ) -> Container:
        """A container whose init waits to start. `init_exec_id`: the id the runtime
        gives the init process ("" names it too); `sandbox_pidns`: share the sandbox's
        PID namespace instead of a new one. A failure leaves nothing behind."""
        check_id("container_id", container_id)
        check_id("exec_id", init_exec_id, may_be_empty=True)
        if container_id in self.containers:
            raise AlreadyExists(f"container {container_id!r} already exists")
        for storage in storages:
            self.storages.check(storage)
        undo = contextlib.AsyncExitStack()
        try:
            for storage in storages:  # first: the rootfs may be one
                undo.push_async_callback(self.storages.release, await self.storages.add(storage))
            config = bundle.container_config(
                container_id, spec, self._placement(container_id, sandbox_pidns)
            )
            container = Container(
                container_id,
                init_exec_id,
                self.run_dir / "containers" / container_id,
                config,
                self.runtime,
                self.pipe_size,
                undo,
            )
            self.containers[container_id] = container
            undo.callback(self.containers.pop, container_id, None)
            await container.create()
            self.oom.watch(container_id, container.cgroup)
            undo.callback(self.oom.forget, container_id)
            self._share_pid_namespace(container)
        except BaseException:
            await _undo_after_failure(container_id, undo)
            raise
        log.info("container created", extra={"container": container_id})
        return container

    def _share_pid_namespace(self, container: Container) -> None:
        """The first container is the sandbox's infra container (sandbox.rs:268-290)."""
        if self._pidns is not None or len(self.containers) > 1:
            return
        assert container.init is not None
        self._pidns = f"/proc/{container.init.pid}/ns/pid"

        def forget() -> None:  # the namespace ends with its init
            self._pidns = None

        container.undo.callback(forget)

    def process(self, container_id: str, exec_id: str, *, for_output: bool = False) -> Process:
        """The process a request names by (container_id, exec_id); "" is the init process."""
        return self.container(container_id).process(exec_id, for_output=for_output)

    async def remove_container(self, container_id: str, timeout: float | None) -> None:
        await self.container(container_id).remove(timeout)
        log.info("container removed", extra={"container": container_id})


async def _undo_after_failure(container_id: str, undo: contextlib.AsyncExitStack) -> None:
    try:
        await undo.aclose()
    except Exception as exc:  # the failure that got us here is the one to report
        log.warning("cleaning up after container %s failed to create: %s", container_id, exc)
