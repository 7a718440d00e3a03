"""The `run` built-in: one container, as `docker run --rm` runs one.

    run [-i] [-t] [--] [COMMAND [ARGS...]]

It drives the agent the way the Kata shim does: CreateContainer,
StartContainer, then at once ReadStdout and ReadStderr in 32 KiB calls,
concurrently, until each answers empty data (the end of the stream);
WriteStdin and CloseStdin for the input; TtyWinResize for a terminal; after
the streams end WaitProcess, then RemoveContainer - always, however the run
ends. The output is written as the bytes it is, and the tool's exit status
is the process's (128 + n when a signal killed it).

Interrupts (SIGINT, SIGTERM): the first goes to the process; the next kills
every process of the container (SignalProcess with exec_id "" and SIGKILL).
An interrupt before the process started removes the container unstarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import termios
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..api import agent_pb2
from ..ttrpc import Code
from . import terminal
from .api import METHODS, CommandError
from .autovalues import new_id

if TYPE_CHECKING:
    from .session import Session

USAGE = "run [-i] [-t] [--] [COMMAND [ARGS...]]"
#: The shim's read and write size.
CHUNK = 32 * 1024
STDIN, STDOUT, STDERR = 0, 1, 2


@dataclass
class RunOptions:
    interactive: bool = False  # -i: forward our stdin
    tty: bool = False  # -t: a terminal
    args: list[str] = field(default_factory=list)


def parse(words: list[str]) -> RunOptions:
    """`-i`, `-t`, `-it`, `--interactive`, `--tty`, `--`, then the command."""
    options = RunOptions()
    for n, word in enumerate(words):
        if word == "--":
            options.args = words[n + 1 :]
            return options
        if word == "--interactive":
            options.interactive = True
            continue
        if word == "--tty":
            options.tty = True
            continue
        if word.startswith("-") and len(word) > 1 and not word.startswith("--"):
            for letter in word[1:]:
                if letter == "i":
                    options.interactive = True
                elif letter == "t":
                    options.tty = True
                else:
                    raise CommandError(f"run: unknown option -{letter}; usage: {USAGE}")
            continue
        if word.startswith("--"):
            raise CommandError(f"run: unknown option {word}; usage: {USAGE}")
        options.args = words[n:]
        return options
    return options


def stdin_is_data() -> bool:
    """Our stdin is a pipe, a file or a socket: input meant for the process, as
    `cmd | kata-agent-ctl ... -c 'run ...'` means it (a terminal or /dev/null is not)."""
    try:
        mode = os.fstat(STDIN).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode)


class Run:
    """One `run`: create, start, stream, wait, remove."""

    def __init__(self, session: Session, options: RunOptions) -> None:
        self.session = session
        self.options = options
        self.cid = new_id()
        self.started = False
        self.interrupts: list[int] = []
        #: a terminal for the process; our stdin forwarded to it
        self.tty = options.tty
        self.forward = options.interactive
        self._killed = False
        self._signalling: set[asyncio.Task[object]] = set()

    # --- what the session calls ----------------------------------------------------

    async def execute(self) -> int | None:
        """The process's exit status; None if it could not run (the failure is reported)."""
        session = self.session
        auto = session.auto
        spec = auto.base_spec() if auto is not None else None
        if auto is None or spec is None:
            raise CommandError(
                "run needs a container image: --bundle-dir (a bundle, or a rootfs directory), "
                "or --guest-rootfs"
            )
        bundle_terminal = False
        if self.options.args:
            del spec.Process.Args[:]
            spec.Process.Args.extend(self.options.args)
        elif not spec.Process.Args:
            raise CommandError(f"the bundle's config.json has no process args; {USAGE}")
        else:  # the bundle's own process, and its terminal setting, as crun run does
            bundle_terminal = spec.Process.Terminal
        self.tty = self.options.tty or bundle_terminal
        spec.Process.Terminal = self.tty
        self.forward = (
            self.options.interactive
            or (bundle_terminal and os.isatty(STDIN))  # crun run: the terminal, keys and all
            or (session.stdin_free and stdin_is_data())
        )
        window = terminal.first_size(STDOUT, STDIN) if self.tty else None
        if window is not None:
            spec.Process.ConsoleSize.Height, spec.Process.ConsoleSize.Width = window
        create = agent_pb2.CreateContainerRequest(
            container_id=self.cid, exec_id=self.cid, OCI=spec, storages=auto.storages()
        )
        outcome = await session.call(METHODS["CreateContainer"], [], create)
        if outcome.code != Code.OK:
            session.report(outcome)
            return None
        try:
            return await self._run()
        finally:
            remove = agent_pb2.RemoveContainerRequest(container_id=self.cid)
            removed = await session.call(METHODS["RemoveContainer"], [], remove)
            if removed.code != Code.OK:
                session.report(removed)

    def interrupt(self, signum: int) -> None:
        """SIGINT or SIGTERM for the tool: the first to the process, then kill it all."""
        self.interrupts.append(signum)
        if not self.started:
            return  # seen once StartContainer answers
        if len(self.interrupts) == 1:
            name = signal.Signals(signum).name
            self.session.note(
                f"{name} passed to the container; again to kill it", after_interrupt=True
            )
            self._signal(signum, self.cid)
        else:
            self.session.note("killing the container", after_interrupt=True)
            self._signal(signal.SIGKILL, "")

    # --- the steps -------------------------------------------------------------------

    async def _run(self) -> int | None:
        session = self.session
        if self.interrupts:
            return None  # interrupted while it was being created
        outcome = await session.call(
            METHODS["StartContainer"], [], agent_pb2.StartContainerRequest(container_id=self.cid)
        )
        if outcome.code != Code.OK:
            session.report(outcome)
            return None
        self.started = True
        if session.auto is not None:  # later commands act on it: WaitProcess, ...
            session.auto.container_id, session.auto.exec_id = self.cid, ""
        if self.interrupts:  # while it was starting: it is not wanted any more
            self._signal(signal.SIGKILL, "")
        loop = asyncio.get_running_loop()
        with self._local_terminal(loop):
            if self.tty:
                self._resize()
            feeding = loop.create_task(self._feed_stdin() if self.forward else self._no_stdin())
            pumps = [self._pump("ReadStdout", "stdout")]
            if not self.tty:  # a terminal's output is all on stdout
                pumps.append(self._pump("ReadStderr", "stderr"))
            await asyncio.gather(*pumps)
            feeding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeding
        if self._signalling:
            await asyncio.gather(*self._signalling, return_exceptions=True)
        waited = await session.call(
            METHODS["WaitProcess"],
            [],
            agent_pb2.WaitProcessRequest(container_id=self.cid, exec_id=self.cid),
        )
        if waited.code != Code.OK:
            session.report(waited)
            return None
        assert isinstance(waited.reply, agent_pb2.WaitProcessResponse)
        return waited.reply.status

    @contextlib.contextmanager
    def _local_terminal(self, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
        """Raw mode for a terminal we forward keys from; output untouched for a terminal;
        the window's resizes passed on."""
        with contextlib.ExitStack() as stack:
            if self.tty and self.forward and os.isatty(STDIN):
                stack.enter_context(terminal.raw(STDIN))
            if self.tty:
                stack.enter_context(terminal.untouched_output(STDOUT))
                stack.enter_context(
                    terminal.signals_to_loop(loop, {signal.SIGWINCH: lambda _n: self._resize()})
                )
            yield
            if self.tty and os.isatty(STDIN):
                # What the terminal answered to the program's queries, or keys typed for
                # it after it ended, is not for the command line.
                with contextlib.suppress(OSError):
                    termios.tcflush(STDIN, termios.TCIFLUSH)

    async def _pump(self, method: str, stream: str) -> None:
        request = agent_pb2.ReadStreamRequest(container_id=self.cid, exec_id=self.cid, len=CHUNK)
        while True:
            outcome = await self.session.call(METHODS[method], [], request)
            reply = outcome.reply
            if outcome.code != Code.OK or not isinstance(reply, agent_pb2.ReadStreamResponse):
                return  # the container is gone (the wait says why)
            if not reply.data:
                return  # the end of the stream
            if not self.session.write_stream(stream, reply.data, method) and not self._killed:
                # Nobody reads our output any more: as SIGPIPE would, end the process.
                self._killed = True
                self._signal(signal.SIGKILL, "")

    async def _feed_stdin(self) -> None:
        async for chunk in read_stdin():
            request = agent_pb2.WriteStreamRequest(
                container_id=self.cid, exec_id=self.cid, data=chunk
            )
            outcome = await self.session.call(METHODS["WriteStdin"], [], request)
            if outcome.code != Code.OK:
                return  # the process has exited: the rest of the input is not wanted
        await self._no_stdin()

    async def _no_stdin(self) -> None:
        await self.session.call(
            METHODS["CloseStdin"],
            [],
            agent_pb2.CloseStdinRequest(container_id=self.cid, exec_id=self.cid),
        )

    def _resize(self) -> None:
        window = terminal.first_size(STDOUT, STDIN)
        if window is None:
            return
        request = agent_pb2.TtyWinResizeRequest(
            container_id=self.cid, exec_id=self.cid, row=window[0], column=window[1]
        )
        self._spawn(self.session.call(METHODS["TtyWinResize"], [], request))

    def _signal(self, signum: int, exec_id: str) -> None:
        request = agent_pb2.SignalProcessRequest(
            container_id=self.cid, exec_id=exec_id, signal=int(signum)
        )
        self._spawn(self.session.call(METHODS["SignalProcess"], [], request))

    def _spawn(self, call: Coroutine[Any, Any, object]) -> None:
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(call)
        self._signalling.add(task)
        task.add_done_callback(self._signalling.discard)


async def read_stdin() -> AsyncIterator[bytes]:
    """Our stdin in chunks of at most CHUNK bytes, read only once the last one is sent
    (so at most one chunk is held here); ends at the end of the input."""
    loop = asyncio.get_running_loop()
    try:  # a pipe, socket or terminal: wait until it is readable
        await _readable(loop)
        pollable = True
    except PermissionError:  # a regular file or /dev/null: reading never waits
        pollable = False
    while True:
        if pollable:
            chunk = os.read(STDIN, CHUNK)
        else:
            chunk = await asyncio.to_thread(os.read, STDIN, CHUNK)
        if not chunk:
            return
        yield chunk
        if pollable:
            await _readable(loop)


async def _readable(loop: asyncio.AbstractEventLoop) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def now_readable() -> None:
        loop.remove_reader(STDIN)  # level-triggered: it would fire again until read
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(STDIN, now_readable)
    try:
        await ready
    finally:
        loop.remove_reader(STDIN)
