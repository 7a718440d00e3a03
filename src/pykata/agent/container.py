"""A container: its bundle, its init process, its execs, driven through the runtime."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import shutil
import signal as signals
from pathlib import Path
from typing import Any

from . import cgroups
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, ProcessNotFound
from .ids import check_id
from .process import Process
from .reaper import WatchedProcess, orphans
from .runtime import OciRuntime
from .stdio import ConsoleSocket, PipeStdio, TerminalStdio

log = logging.getLogger("pykata.agent.container")


class State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


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
    def __init__(
        self,
        container_id: str,
        bundle: Path,
        config: dict[str, Any],
        runtime: OciRuntime,
        pipe_size: int,
    ) -> None:
        self.id = container_id
        self.bundle = bundle
        self.config = config
        self.runtime = runtime
        self.pipe_size = pipe_size
        self.state = State.CREATED
        self._state_before_pause = State.RUNNING
        self.init: Process | None = None
        #: The exec id the runtime gave the init process at CreateContainer ("" also names it).
        self.init_exec_id = ""
        self.execs: dict[str, Process] = {}
        #: Storages mounted for this container, released when it is removed.
        self.storage_points: list[Path] = []
        self._lock = asyncio.Lock()

    @property
    def cgroup(self) -> str:
        return str(self.config["linux"]["cgroupsPath"])

    async def create(self) -> None:
        (self.bundle / "config.json").write_text(json.dumps(self.config))
        terminal = bool(self.config.get("process", {}).get("terminal"))

        async def launch(stdio: Any, console: Path | None, pid_file: Path) -> None:
            await self.runtime.create(
                self.id, self.bundle, pid_file, console_socket=console, stdio=stdio
            )

        self.init = await spawn(self.id, "", self.bundle, terminal, self.pipe_size, launch)
        self.init.when_exited(self._init_exited)

    def _init_exited(self) -> None:
        self.state = State.STOPPED

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

    def _require(self, *states: State, action: str) -> None:
        if self.state not in states:
            raise FailedPrecondition(
                f"cannot {action} container {self.id}: it is {self.state.value}"
            )

    async def start(self) -> None:
        # A second start answers an error; upstream's blocks for ever, holding its lock.
        async with self._lock:
            self._require(State.CREATED, action="start")
            await self.runtime.start(self.id)
            if self.state is State.CREATED:
                self.state = State.RUNNING

    async def exec(self, exec_id: str, spec: dict[str, Any]) -> Process:
        async with self._lock:
            self._require(State.RUNNING, action=f"exec {exec_id} in")
            if not exec_id:
                raise InvalidArgument("exec_id is empty: an exec needs an id of its own")
            check_id("exec_id", exec_id)
            if exec_id in self.execs or exec_id == self.init_exec_id:
                raise AlreadyExists(f"container {self.id} already has an exec {exec_id}")
            spec = dict(spec)
            if not spec.get("args"):
                raise InvalidArgument(f"process.Args is empty for exec {exec_id}")
            spec.setdefault("cwd", "/")
            spec.setdefault("user", {"uid": 0, "gid": 0})
            process_file = self.bundle / f"{exec_id}.process.json"
            process_file.write_text(json.dumps(spec))

            async def launch(stdio: Any, console: Path | None, pid_file: Path) -> None:
                await self.runtime.exec(
                    self.id, process_file, pid_file, console_socket=console, stdio=stdio
                )

            proc = await spawn(
                self.id, exec_id, self.bundle, bool(spec.get("terminal")), self.pipe_size, launch
            )
            proc.on_finished = lambda: self._forget(proc)
            self.execs[exec_id] = proc
            return proc

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
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signals.SIGKILL)

    async def wait(self, exec_id: str) -> int:
        return await self.process(exec_id).wait()

    def _forget(self, process: Process) -> None:
        """An exec whose status was collected and whose output was all read: gone."""
        if self.execs.get(process.exec_id) is process:
            del self.execs[process.exec_id]
            process.close()

    async def pause(self) -> None:
        async with self._lock:
            self._require(State.CREATED, State.RUNNING, action="pause")
            await self.runtime.pause(self.id)
            await self._settle_freezer("FROZEN")
            self._state_before_pause, self.state = self.state, State.PAUSED

    async def resume(self) -> None:
        async with self._lock:
            self._require(State.PAUSED, action="resume")
            await self.runtime.resume(self.id)
            await self._settle_freezer("THAWED")
            self.state = self._state_before_pause

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

    async def update(self, resources: dict[str, Any]) -> None:
        self._require(State.CREATED, State.RUNNING, State.PAUSED, action="update")
        resources_file = self.bundle / "resources.json"
        resources_file.write_text(json.dumps(resources))
        await self.runtime.update(self.id, resources_file)

    async def remove(self, timeout: float | None) -> None:
        """Stop everything in the container and delete all trace of it."""
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
            await self.runtime.delete(self.id, force=True)
            for proc in [*self.execs.values(), *([self.init] if self.init else [])]:
                proc.close()
            self.execs.clear()
            self.state = State.STOPPED
            shutil.rmtree(self.bundle, ignore_errors=True)
