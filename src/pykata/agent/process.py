"""A process in a container: its streams, its signals, its exit status.

As upstream's agent does, a process is gone for the API once its exit
status has been collected (WaitProcess): later waits, signals and stdin
calls find no such process. Its output stays readable until its end,
though - upstream discards unread output there; we never drop a byte.
When the process exits, stdin is closed (pending writes are answered)
and what is left of its output moves into memory, so an exited process
holds no file descriptors (bounded by what its pipes could hold).
"""

from __future__ import annotations

import asyncio
import errno
import signal as signals
from collections.abc import Callable

from .errors import FailedPrecondition, LimitExceeded, NoTerminal
from .reaper import WatchedProcess
from .stdio import InPipe, OutputReader, PipeStdio, StdinBacklogFull, TerminalStdio

# ^D: on a terminal, "close stdin" means end-of-file for the reader.
EOT = b"\x04"
#: Output kept per stream once the process has exited: what a default pipe holds.
KEPT_OUTPUT_LIMIT = 1 << 20
#: Most bytes one read answers (upstream has no limit: it allocates what is asked).
MAX_READ = 1 << 20


class Process:
    def __init__(
        self,
        container_id: str,
        exec_id: str,
        stdio: PipeStdio | TerminalStdio,
        watched: WatchedProcess,
    ) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.stdio = stdio
        self._watched = watched
        #: The exit status has been collected: the process is gone for the API.
        self.waited = False
        #: Called once the status has been collected and all output read.
        self.on_finished: Callable[[], None] | None = None
        self._collector: asyncio.Task[None] | None = None
        watched.exited.add_done_callback(self._exited)

    @property
    def name(self) -> str:
        which = f"exec {self.exec_id}" if self.exec_id else "init process"
        return f"{which} of container {self.container_id}"

    @property
    def pid(self) -> int:
        return self._watched.pid

    @property
    def exited(self) -> bool:
        return self._watched.exited.done()

    @property
    def output_ended(self) -> bool:
        stderr = self.stdio.stderr
        return self.stdio.stdout.ended and (stderr is None or stderr.ended)

    def _exited(self, _status: asyncio.Future[int]) -> None:
        self.stdio.stdin.close()
        self._collector = asyncio.ensure_future(self._collect_output())

    async def _collect_output(self) -> None:
        for reader in (self.stdio.stdout, self.stdio.stderr):
            if reader is not None:
                await reader.collect_rest(KEPT_OUTPUT_LIMIT)

    def _maybe_finished(self) -> None:
        if self.waited and self.output_ended and self.on_finished is not None:
            self.on_finished()

    async def wait(self) -> int:
        status = await asyncio.shield(self._watched.exited)
        self.waited = True
        self._maybe_finished()
        return status

    def when_exited(self, callback: Callable[[], None]) -> None:
        self._watched.exited.add_done_callback(lambda _status: callback())

    def signal(self, signum: int) -> None:
        """Send `signum` (0 checks nothing); a no-op once the process has exited.

        SIGTERM to a container's init that does not handle it becomes
        SIGKILL, as upstream does (rpc.rs:549-555): as PID 1 of its PID
        namespace, an init without a handler never sees SIGTERM at all.
        """
        if signum == signals.SIGTERM and not self.exec_id and not _handles(self.pid, signum):
            signum = signals.SIGKILL
        self._watched.send_signal(signum)

    async def write_stdin(self, data: bytes) -> int:
        """Write all of `data`, after the writes before it; empty data closes stdin (upstream)."""
        if not data:
            await self.close_stdin()
            return 0
        if self.stdio.stdin.closed:
            raise FailedPrecondition(f"stdin of the {self.name} is closed")
        try:
            return await self.stdio.stdin.write(data)
        except StdinBacklogFull as exc:
            raise LimitExceeded(f"stdin of the {self.name}: {exc}") from None
        except BrokenPipeError:
            state = "has exited" if self.exited else "closed its stdin or exited"
            raise FailedPrecondition(
                f"stdin of the {self.name}: not all data was written, the process {state}"
            ) from None

    async def close_stdin(self) -> None:
        """After the writes already waiting; a terminal gets end-of-file (^D) instead."""
        stdin = self.stdio.stdin
        if stdin.closed:
            return
        if self.stdio.terminal:
            await stdin.write(EOT)
        else:
            await stdin.close_after_writes()

    async def read(self, stream: str, size: int) -> bytes:
        """Up to `size` bytes; b"" at the end of the stream (after every byte before it)."""
        data = await self._output(stream, size, in_pipe=False)
        assert isinstance(data, bytes)
        return data

    async def next_output(self, stream: str, size: int) -> bytes | InPipe:
        """As read(), but output from a pipe comes as an InPipe: the caller moves
        those bytes on (splice(2)) before it next awaits anything."""
        return await self._output(stream, size, in_pipe=True)

    async def output_ready(self, stream: str) -> None:
        """Until `stream` has output to take, or has ended (nothing is taken)."""
        reader = self._reader(stream)
        if reader is not None:
            await reader.ready()

    def _reader(self, stream: str) -> OutputReader | None:
        return self.stdio.stdout if stream == "stdout" else self.stdio.stderr

    async def _output(self, stream: str, size: int, *, in_pipe: bool) -> bytes | InPipe:
        reader = self._reader(stream)
        if reader is None or size <= 0:
            # A terminal's output is all on stdout: its stderr is empty, never ours to steal.
            return b""
        size = min(size, MAX_READ)
        output = await (reader.next_output(size) if in_pipe else reader.read(size))
        if not output:
            self._maybe_finished()
        return output

    def resize(self, rows: int, columns: int) -> None:
        try:
            self.stdio.resize(rows, columns)
        except OSError as exc:
            if exc.errno == errno.ENOTTY:
                raise NoTerminal(f"the {self.name} has no terminal") from None
            raise

    def close(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
        self.stdio.close()
        self._watched.close()


def _handles(pid: int, signum: int) -> bool:
    """Whether the process catches, ignores or blocks `signum` (/proc/PID/status)."""
    bit = 1 << (signum - 1)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("SigCgt", "SigIgn", "SigBlk") and int(value, 16) & bit:
                    return True
    except (OSError, ValueError):
        pass
    return False
