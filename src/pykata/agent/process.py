"""A process in a container: its streams, its signals, its exit status."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable

from .errors import EndOfStream, FailedPrecondition
from .reaper import WatchedProcess
from .stdio import PipeStdio, TerminalStdio

# ^D: on a terminal, "close stdin" means end-of-file for the reader.
EOT = b"\x04"


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
        self.waited = False
        self._ended: set[str] = set()
        #: Called once the exit status has been collected and all output read.
        self.on_finished: Callable[[], None] | None = None

    @property
    def output_drained(self) -> bool:
        streams = {"stdout"} if self.stdio.stderr is None else {"stdout", "stderr"}
        return streams <= self._ended

    def _maybe_finished(self) -> None:
        if self.waited and self.output_drained and self.on_finished is not None:
            self.on_finished()

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

    async def wait(self) -> int:
        status = await asyncio.shield(self._watched.exited)
        self.waited = True
        self._maybe_finished()
        return status

    def when_exited(self, callback: Callable[[], None]) -> None:
        self._watched.exited.add_done_callback(lambda _status: callback())

    def signal(self, signum: int) -> None:
        self._watched.send_signal(signum)

    async def write_stdin(self, data: bytes) -> int:
        if self.stdio.stdin is None or self.stdio.stdin.fd is None:
            raise FailedPrecondition(f"stdin of the {self.name} is closed")
        try:
            return await self.stdio.stdin.write(data)
        except BrokenPipeError:
            raise FailedPrecondition(f"stdin of the {self.name} has no reader any more") from None

    async def close_stdin(self) -> None:
        if self.stdio.stdin is None:
            return
        if self.stdio.terminal:
            await self.stdio.stdin.write(EOT)
        else:
            self.stdio.stdin.close()

    async def read(self, stream: str, size: int) -> bytes:
        reader = self.stdio.stdout if stream == "stdout" else self.stdio.stderr
        if reader is None:
            raise FailedPrecondition(f"the {self.name} has a terminal: its output is all on stdout")
        data = await reader.read(max(1, min(size, 1 << 20)))
        if not data:
            self._ended.add(stream)
            self._maybe_finished()
            raise EndOfStream(f"{stream} of the {self.name} has ended")
        return data

    def resize(self, rows: int, columns: int) -> None:
        try:
            self.stdio.resize(rows, columns)
        except OSError as exc:
            if exc.errno == errno.ENOTTY:
                raise FailedPrecondition(f"the {self.name} has no terminal") from None
            raise

    def close(self) -> None:
        self.stdio.close()
        self._watched.close()
