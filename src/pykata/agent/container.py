"""A container: its bundle, its init process, its execs, driven through the runtime."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal as signals
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from . import bundle, cgroups
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, ProcessNotFound
from .ids import check_id
from .lifecycle import Action, Lifecycle, State
from .process import Process
from .reaper import WatchedProcess, orphans
from .runtime import OciRuntime
from .stdio import ConsoleSocket, PipeStdio, TerminalStdio

log = logging.getLogger("pykata.agent.container")


async def spawn(
    container_id: str, exec_id: str, workdir: Path, terminal: bool, pipe_size: int, launch: Any
) -> Process:
    """Prepare streams, let `launch(stdio, console_socket, pid_file)` run the runtime,
    then adopt the process it left behind (reparented to us, the subreaper)."""
    pid_file = workdir / f"{exec_id or 'init'}.pid"
    # Until the new process is watched, a sweep could reap it as an orphan.
    with orphans.runtime_running():
        stdio = await (
            _with_terminal(launch, pid_file)
            if terminal
            else _with_pipes(launch, pid_file, pipe_size)
        )
        return Process(container_id, exec_id, stdio, WatchedProcess(int(pid_file.read_text())))


async def _with_terminal(launch: Any, pid_file: Path) -> TerminalStdio:
    console = ConsoleSocket()
    try:
        master = asyncio.ensure_future(console.receive_master())
        try:
            # Never pipes here: the container would inherit them and keep them open.
            devnull = asyncio.subprocess.DEVNULL
            await launch((devnull, devnull, devnull), console.path, pid_file)
        except BaseException:
            master.cancel()
            raise
        return TerminalStdio(await master)
    finally:
        console.close()


async def _with_pipes(launch: Any, pid_file: Path, pipe_size: int) -> PipeStdio:
    stdio = PipeStdio(pipe_size)
    try:
        await launch(stdio.child_fds, None, pid_file)
    except BaseException:
        stdio.close()
        raise
    stdio.close_child_ends()
    return stdio


class Container:
    """A container created through the runtime.

    `undo` holds, in the order they were done, the steps that undo its
    creation (storages, bundle, runtime state, cgroup, registrations - the
    sandbox's and its own): a failed create and `remove()` both close it, so
    each step's undoing is written once, next to the step.
    """

    def __init__(
        self,
        container_id: str,
        init_exec_id: str,
        bundle: Path,
        config: dict[str, Any],
        runtime: OciRuntime,
        pipe_size: int,
        undo: contextlib.AsyncExitStack,
    ) -> None:
        self.id = container_id
        #: The exec id the runtime gave the init process at CreateContainer ("" names it too).
        self.init_exec_id = init_exec_id
        self.bundle = bundle
        self.config = config
        self.runtime = runtime
        self.pipe_size = pipe_size
        self.lifecycle = Lifecycle(container_id)
        self.init: Process | None = None
        self.execs: dict[str, Process] = {}
        self.undo = undo
        self._lock = asyncio.Lock()

    @property
    def cgroup(self) -> str:
        return str(self.config["linux"]["cgroupsPath"])

    @property
    def state(self) -> State:
        return self.lifecycle.state

    def stats(self) -> cgroups.CgroupStats:
        return cgroups.stats(self.cgroup)

    async def runtime_state(self) -> dict[str, Any]:
        """The runtime's own view of the container (`state`)."""
        return await self.runtime.state(self.id)

    async def create(self) -> None:
        """The bundle and the runtime's container, its init process waiting to start."""
        self.bundle.mkdir(parents=True, exist_ok=False)
        self.undo.callback(shutil.rmtree, self.bundle, ignore_errors=True)
        (self.bundle / "config.json").write_text(json.dumps(self.config))
        terminal = bool(self.config["process"].get("terminal"))

        async def launch(stdio: Any, console: Path | None, pid_file: Path) -> None:
            await self.runtime.create(
                self.id, self.bundle, pid_file, console_socket=console, stdio=stdio
            )

        # Pushed first, so they run last: the cgroup goes once the runtime let it go.
        self.undo.callback(cgroups.remove, self.cgroup, stop_at=self.cgroup)
        self.undo.push_async_callback(self.runtime.delete, self.id, force=True)
        self.init = await spawn(self.id, "", self.bundle, terminal, self.pipe_size, launch)
        self.undo.callback(self._close_processes)
        self.init.when_exited(self.lifecycle.stopped)

    @property
    def rootfs(self) -> Path:
        """The container's rootfs directory, as the agent sees it."""
        return Path(self.bundle, self.config["root"]["path"])

    def open_root(self) -> int:
        """An O_PATH fd of the container's root directory: as its processes see it
        (their mounts included) while its init runs, else its rootfs."""
        flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
        if self.init is not None and not self.init.exited:
            # The init is our child and not reaped yet, so its pid is still its own.
            with contextlib.suppress(OSError):
                return os.open(f"/proc/{self.init.pid}/root", flags)
        return os.open(self.rootfs, flags)

    def _close_processes(self) -> None:
        for proc in [*self.execs.values(), *([self.init] if self.init else [])]:
            proc.close()
        self.execs.clear()

    def process(self, exec_id: str, *, for_output: bool = False) -> Process:
        """The init process ("" or the init's exec id) or an exec.

        A process whose exit status was collected is gone, as upstream; with
        `for_output`, only once its output has been read to the end as well.
        """
        check_id("exec_id", exec_id, may_be_empty=True)
        if not exec_id or exec_id == self.init_exec_id:
            process = self.init
        else:
            process = self.execs.get(exec_id)
        which = f"exec {exec_id}" if exec_id else "init process"
        if process is None:
            raise ProcessNotFound(f"container {self.id} has no {which}")
        if process.waited and (not for_output or process.output_ended):
            raise ProcessNotFound(
                f"the {which} of container {self.id} has exited and its status was collected"
            )
        return process

    async def _act(self, action: Action, step: Callable[[], Awaitable[None]]) -> None:
        """One lifecycle action: allowed now (lifecycle.TABLE), done, state moved on."""
        async with self._lock:
            self.lifecycle.check(action)
            await step()
            self.lifecycle.done(action)

    async def start(self) -> None:
        # A second start answers an error; upstream's blocks for ever, holding its lock.
        await self._act(Action.START, lambda: self.runtime.start(self.id))

    async def pause(self) -> None:
        async def pause() -> None:
            await self.runtime.pause(self.id)
            await self._settle_freezer("FROZEN")

        await self._act(Action.PAUSE, pause)

    async def resume(self) -> None:
        async def resume() -> None:
            await self.runtime.resume(self.id)
            await self._settle_freezer("THAWED")

        await self._act(Action.RESUME, resume)

    async def update(self, resources: dict[str, Any]) -> None:
        resources_file = self.bundle / "resources.json"

        async def update() -> None:
            resources_file.write_text(json.dumps(resources))
            await self.runtime.update(self.id, resources_file)

        await self._act(Action.UPDATE, update)

    async def exec(
        self, exec_id: str, spec: dict[str, Any], *, pipe_size: int | None = None
    ) -> Process:
        """Run a process in the container; `pipe_size`: its output pipes' size, if not
        the container's (streaming execs read larger pieces from larger pipes)."""
        if not exec_id:
            raise InvalidArgument("exec_id is empty: an exec needs an id of its own")
        check_id("exec_id", exec_id)
        process_spec = bundle.process_spec(spec, f"exec {exec_id}: process")
        started: list[Process] = []

        async def exec_() -> None:
            if exec_id in self.execs or exec_id == self.init_exec_id:
                raise AlreadyExists(f"container {self.id} already has an exec {exec_id}")
            process_file = self.bundle / f"{exec_id}.process.json"
            process_file.write_text(json.dumps(process_spec))

            async def launch(stdio: Any, console: Path | None, pid_file: Path) -> None:
                await self.runtime.exec(
                    self.id, process_file, pid_file, console_socket=console, stdio=stdio
                )

            terminal = bool(process_spec.get("terminal"))
            size = self.pipe_size if pipe_size is None else pipe_size
            proc = await spawn(self.id, exec_id, self.bundle, terminal, size, launch)
            proc.on_finished = lambda: self._forget(proc)
            self.execs[exec_id] = proc
            started.append(proc)

        await self._act(Action.EXEC, exec_)
        return started[0]

    async def signal(self, exec_id: str, signum: int) -> None:
        """Signal one process; SIGKILL with no exec id kills every process of the container."""
        if not exec_id and signum == signals.SIGKILL:
            await self.kill_all()
            return
        self.process(exec_id).signal(signum)

    async def kill_all(self) -> None:
        """SIGKILL every process in the container's cgroup, frozen meanwhile so none
        can fork a new one between the listing and the kill (upstream: rpc.rs:580-622)."""
        async with cgroups.frozen(self.cgroup):
            for pid in cgroups.processes(self.cgroup):
                with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                    os.kill(pid, signals.SIGKILL)

    async def wait(self, exec_id: str) -> int:
        return await self.process(exec_id).wait()

    async def end_exec(self, process: Process) -> None:
        """An exec nobody will read or wait for any more (its streaming call ended):
        killed if it still runs, reaped, and forgotten with what is left of its output."""
        if not process.exited:
            with contextlib.suppress(ProcessLookupError):
                process.signal(signals.SIGKILL)
        await process.wait()
        self._forget(process)

    def _forget(self, process: Process) -> None:
        """An exec whose status was collected and whose output was all read: gone."""
        if self.execs.get(process.exec_id) is process:
            del self.execs[process.exec_id]
            process.close()

    async def _settle_freezer(self, wanted: str, timeout: float = 5.0) -> None:
        """Some runtimes return while the freezer is still FREEZING: answer when it is done."""
        deadline = asyncio.get_running_loop().time() + timeout
        while cgroups.freezer_state(self.cgroup) not in (wanted, ""):
            if asyncio.get_running_loop().time() > deadline:
                raise FailedPrecondition(
                    f"container {self.id}: freezer still "
                    f"{cgroups.freezer_state(self.cgroup)} after {timeout}s"
                )
            await asyncio.sleep(0.005)

    async def remove(self, timeout: float | None) -> None:
        """Stop everything in the container, then undo all its creation did."""
        async with self._lock:
            if self.init is not None and not self.init.exited:
                await self.kill_all()  # thaws a paused container too
                self.init.signal(signals.SIGKILL)
                try:
                    await asyncio.wait_for(self.init.wait(), timeout or None)
                except TimeoutError:
                    raise FailedPrecondition(
                        f"container {self.id} did not stop within {timeout}s"
                    ) from None
            self.lifecycle.stopped()
            await self.undo.aclose()
