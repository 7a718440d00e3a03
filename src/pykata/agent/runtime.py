"""The OCI runtime (crun or runc), driven as a separate program.

One method per runtime command. Every invocation logs to a JSON file of its
own while it runs (LogFiles, used again once emptied) so the runtime's own
error message can be put in the caller's status.
The runtime keeps its state under the agent's run directory, never in the
host's default (/run/runc, /run/crun).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from . import tracing
from .errors import RuntimeFailure
from .reaper import orphans, process_exit

log = logging.getLogger("pykata.agent.runtime")

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
UNIFIED = "/sys/fs/cgroup/unified"

Stdio = int | IO[Any] | None


def cgroups_are_hybrid() -> bool:
    """v1 controllers plus a cgroup2 mount at /sys/fs/cgroup/unified."""
    return os.path.ismount(UNIFIED) and os.path.isdir("/sys/fs/cgroup/memory")


_private_namespace = False


def enter_private_mount_namespace() -> None:
    """Give this process a mount namespace of its own, propagating nothing to the host.

    Stand-alone, the agent's mounts (storages, crun's view of cgroups) then
    never show on the host. Must run before any thread starts.
    """
    global _private_namespace
    if _private_namespace:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "make / rprivate")
    _private_namespace = True


def detach_unified_hierarchy() -> None:
    """crun refuses hybrid cgroups; without the cgroup2 mount it sees pure v1."""
    enter_private_mount_namespace()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(UNIFIED.encode(), MNT_DETACH) != 0:
        raise OSError(ctypes.get_errno(), f"umount {UNIFIED}")


def choose(preferred: str) -> str:
    """The runtime binary to use: `preferred` (a name or path), or crun/runc by availability.

    Called at start-up, before threads: choosing crun on a hybrid-cgroup host
    moves the agent into its own mount namespace.
    """
    if preferred and preferred != "auto":
        found = shutil.which(preferred)
        if found is None:
            raise RuntimeFailure(f"OCI runtime {preferred!r} not found")
        if os.path.basename(found) == "crun" and cgroups_are_hybrid():
            detach_unified_hierarchy()
        return found
    crun, runc = shutil.which("crun"), shutil.which("runc")
    if crun and cgroups_are_hybrid():
        try:
            detach_unified_hierarchy()
        except OSError as exc:
            log.warning("crun needs a private mount namespace here (%s); using runc", exc)
            crun = None
    if crun:
        return crun
    if runc:
        return runc
    raise RuntimeFailure("no OCI runtime found: install crun or runc")


#: The invocations' log files, in the runtime's state directory: a name no container
#: id can take (an id begins with a letter or a digit, agent/ids.py).
LOG_DIR = ".logs"
#: Log files kept for the next invocations; more running at once are made, then removed.
MAX_SPARE_LOGS = 8


@dataclass
class LogFile:
    """One invocation's log (--log): its path, and an fd the agent keeps to empty it."""

    path: str
    fd: int


class LogFiles:
    """Log files for runtime invocations, used again rather than made and removed for
    each: on a disk file system creating, truncating and unlinking a file cost about
    as much as the rest of the agent's work for an exec. A file is empty when taken:
    no invocation reads another's errors."""

    def __init__(self, directory: Path, spare: int = MAX_SPARE_LOGS) -> None:
        self.directory = directory
        self.spare = spare
        self._free: list[LogFile] = []
        self._made = 0

    def take(self) -> LogFile:
        if self._free:
            return self._free.pop()
        self._made += 1
        path = f"{self.directory}/log-{self._made}"
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            # Truncated: a file left by an earlier agent must not lend its errors to this call.
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, flags, 0o600)
        return LogFile(path, fd)

    def give_back(self, log_file: LogFile) -> None:
        """Emptied and kept for the next invocation, unless `spare` are kept already
        or its path no longer names the file (then the runtime wrote elsewhere)."""
        with contextlib.suppress(OSError):
            held = os.fstat(log_file.fd)
            if os.path.samestat(os.stat(log_file.path), held) and len(self._free) < self.spare:
                if held.st_size:  # the runtime wrote to it (rarely)
                    os.ftruncate(log_file.fd, 0)
                self._free.append(log_file)
                return
        os.close(log_file.fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(log_file.path)


@dataclass
class OciRuntime:
    binary: str
    #: Runtime state directory (--root).
    root: Path
    #: Create containers with --no-pivot: pivot_root(2) refuses to leave the initial
    #: ramfs, so a guest whose root is its initrd needs it (as upstream's agent does).
    no_pivot: bool = False
    #: `--version`'s output, once asked (an answer that failed is asked again).
    _version: str | None = field(default=None, init=False, repr=False)
    _invocations: int = field(default=0, init=False, repr=False)
    _log_files: LogFiles | None = field(default=None, init=False, repr=False)

    @property
    def name(self) -> str:
        return os.path.basename(self.binary)

    async def _run(
        self,
        *args: str,
        container_id: str,
        stdin: Stdio = None,
        stdout: Stdio = None,
        stderr: Stdio = None,
    ) -> str:
        """Run one runtime command; its output, or RuntimeFailure with its own message.

        Spawned with subprocess (vfork: about a third of the cost of the event
        loop's fork-based spawn) and awaited through a pidfd.
        """
        log_file = self._logs.take()
        # The runtime's stdout and stderr when the caller gives none; create and exec
        # give the container's own, so on a container's path no file is made.
        output = self._unnamed_output() if stdout is None or stderr is None else None
        try:
            command = [
                self.binary,
                "--root",
                str(self.root),
                "--log",
                log_file.path,
                "--log-format",
                "json",
                *args,
            ]
            # Busy while the runtime runs: its helpers must not be taken for orphans.
            span = tracing.step(
                f"runtime {args[0]}", {"runtime": self.name, "container_id": container_id}
            )
            with span, orphans.runtime_running():
                proc = subprocess.Popen(
                    command,
                    stdin=stdin if stdin is not None else subprocess.DEVNULL,
                    stdout=stdout if stdout is not None else output,
                    stderr=stderr if stderr is not None else output,
                )
                started = time.monotonic()
                try:
                    await process_exit(proc.pid)
                except BaseException:
                    # Cancelled (shutdown, a deadline): no runtime process outlives its call.
                    proc.kill()
                    proc.wait()
                    raise
                returncode = proc.wait()
                log.debug(
                    "runtime",
                    extra={
                        "command": list(args),
                        "status": returncode,
                        "ms": round((time.monotonic() - started) * 1e3, 2),
                    },
                )
            text = _read_all(output).decode(errors="replace") if output is not None else ""
            if returncode != 0:
                message = _last_error(log_file.path) or text.strip()
                message = message or f"exit status {returncode}"
                raise RuntimeFailure(f"{self.name} {args[0]} failed: {message}")
            return text
        finally:
            if output is not None:
                os.close(output)
            self._logs.give_back(log_file)

    @property
    def _logs(self) -> LogFiles:
        if self._log_files is None:
            self._log_files = LogFiles(self.root / LOG_DIR)
        return self._log_files

    def _unnamed_output(self) -> int:
        """An unnamed file for one invocation's output. Fresh every time: a process the
        runtime left behind (a hook's) may still hold the last one."""
        self._invocations += 1
        try:
            return _unnamed_file(self.root, self._invocations)
        except FileNotFoundError:
            self.root.mkdir(parents=True, exist_ok=True)
            return _unnamed_file(self.root, self._invocations)

    async def create(
        self,
        container_id: str,
        bundle: Path,
        pid_file: Path,
        *,
        console_socket: Path | None = None,
        stdio: tuple[Stdio, Stdio, Stdio] = (None, None, None),
    ) -> None:
        args = ["create", "--bundle", str(bundle), "--pid-file", str(pid_file)]
        if self.no_pivot:
            args.append("--no-pivot")
        if console_socket is not None:
            args += ["--console-socket", str(console_socket)]
        stdin, stdout, stderr = stdio
        await self._run(
            *args,
            container_id,
            container_id=container_id,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
        )

    async def start(self, container_id: str) -> None:
        await self._run("start", container_id, container_id=container_id)

    async def exec(
        self,
        container_id: str,
        process_file: Path,
        pid_file: Path,
        *,
        console_socket: Path | None = None,
        stdio: tuple[Stdio, Stdio, Stdio] = (None, None, None),
    ) -> None:
        args = ["exec", "--detach", "--process", str(process_file), "--pid-file", str(pid_file)]
        if console_socket is not None:
            args += ["--tty", "--console-socket", str(console_socket)]
        stdin, stdout, stderr = stdio
        await self._run(
            *args,
            container_id,
            container_id=container_id,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
        )

    async def kill(self, container_id: str, signal: int, *, all_processes: bool = False) -> None:
        await self._run(
            "kill",
            *(["--all"] if all_processes else []),
            container_id,
            str(signal),
            container_id=container_id,
        )

    async def delete(self, container_id: str, *, force: bool = True) -> None:
        await self._run(
            "delete", *(["--force"] if force else []), container_id, container_id=container_id
        )

    async def pause(self, container_id: str) -> None:
        await self._run("pause", container_id, container_id=container_id)

    async def resume(self, container_id: str) -> None:
        await self._run("resume", container_id, container_id=container_id)

    async def update(self, container_id: str, resources_file: Path) -> None:
        # A file, not stdin: crun opens /dev/stdin, which fails on a socket.
        await self._run(
            "update", "--resources", str(resources_file), container_id, container_id=container_id
        )

    async def supports_seccomp(self) -> bool:
        """Whether the runtime was built with seccomp (crun: +SECCOMP, runc: libseccomp).

        Asked on GetGuestDetails, once (not at start-up): its `--version` is cached.
        """
        text = await self._version_text()
        return "+SECCOMP" in text or "libseccomp" in text

    async def version(self) -> str:
        """The first line of `--version` ("crun version 1.14.1"), or the binary's name."""
        lines = (await self._version_text()).splitlines()
        return lines[0].strip() if lines else self.name

    async def _version_text(self) -> str:
        if self._version is None:
            text = await self._ask_version()
            if not text:
                return ""
            self._version = text
        return self._version

    async def _ask_version(self) -> str:
        with orphans.runtime_running():  # its exit status is asyncio's, not the sweeper's
            try:
                proc = await asyncio.create_subprocess_exec(
                    self.binary,
                    "--version",
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.DEVNULL,
                )
            except OSError as exc:
                log.warning("cannot ask %s --version: %s", self.binary, exc)
                return ""
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                log.warning("%s --version did not answer in 10 s", self.binary)
                return ""
        return out.decode(errors="replace")

    async def state(self, container_id: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(
            await self._run("state", container_id, container_id=container_id)
        )
        return result


def _unnamed_file(directory: Path, n: int) -> int:
    """A new file with no name in `directory` (O_TMPFILE; where the file system has
    none, a named one removed at once)."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        raise
    except OSError:
        pass  # no O_TMPFILE on this file system (EOPNOTSUPP; EISDIR on old kernels)
    path = f"{directory}/output-{n}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.unlink(path)
    return fd


def _read_all(fd: int) -> bytes:
    """What a file descriptor's file holds, from its start."""
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 16, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _last_error(log_path: str) -> str:
    """The last error-level message of a runtime's JSON log."""
    message = ""
    with contextlib.suppress(OSError), open(log_path, errors="replace") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("level") in ("error", "fatal", "panic"):
                    message = str(entry.get("msg", "")).strip()
    return message
