"""Exec: a process in a container with its stdin, stdout, stderr and exit
status on one stream, in place of the ReadStdout/WriteStdin polling calls.

Output is taken as it comes, up to a chunk at a time, within the client's
window; output waiting in a pipe is moved into the connection's socket by
splice(2) behind its frame header, never copied through Python (a terminal's
output, and output kept after the exit, are read). The exit status follows
the last output byte. A
client that closes its side before the exit status has come, or whose
connection is lost, has the process killed: nothing is left running that
nobody can see.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal as signals
from typing import Any

from .. import ocispec
from ..api import extensions_pb2 as ext
from ..extensions.wire import data_tag
from .channel import Channel
from .container import Container
from .errors import InvalidArgument, LimitExceeded, MissingField
from .process import Process
from .stdio import InPipe

#: Output pipes of a streaming exec: Linux's default largest pipe (pipe-max-size), so a
#: fast writer is read in pieces of up to 1 MiB, not 64 KiB.
PIPE_SIZE = 1 << 20
STDOUT_TAG = data_tag(ext.ExecOutput, "stdout")
STDERR_TAG = data_tag(ext.ExecOutput, "stderr")


class StreamExecs:
    """Every streaming exec running now, all connections together (bounded)."""

    def __init__(self, limit: int, chunk: int) -> None:
        self.limit = limit
        self.chunk = chunk
        self.open = 0

    async def run(
        self, channel: Channel[ext.ExecInput], container: Container, start: ext.ExecStart
    ) -> None:
        if not start.HasField("process"):
            raise MissingField("start.process is missing: Exec needs a process to run")
        if self.open >= self.limit:
            raise LimitExceeded(f"too many streaming execs running (limit {self.limit})")
        self.open += 1
        try:
            exec_id = start.exec_id  # (made up by the handler if the client gave none)
            process = await container.exec(
                exec_id, ocispec.to_json(start.process), pipe_size=PIPE_SIZE
            )
            try:
                channel.send(ext.ExecOutput(exec_id=exec_id))
                await _serve(channel, container, process, self.chunk)
            finally:
                await container.end_exec(process)
        finally:
            self.open -= 1


async def _serve(
    channel: Channel[ext.ExecInput], container: Container, process: Process, chunk: int
) -> None:
    inputs = asyncio.ensure_future(_inputs(channel, process))
    streams = ["stdout"] if process.stdio.terminal else ["stdout", "stderr"]
    outputs: asyncio.Future[list[None]] = asyncio.gather(
        *(_output(channel, process, s, chunk) for s in streams)
    )
    try:
        # Until the output ends; what the client sent wrong ends the call at once.
        waiting: list[asyncio.Future[Any]] = [outputs, inputs]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if inputs.done() and not inputs.cancelled() and inputs.exception() is not None:
            raise inputs.exception()  # type: ignore[misc]
        await outputs
        status = await container.wait(process.exec_id)
        channel.send(ext.ExecOutput(exited=True, exit_status=status))
        await inputs  # until the client closes its side
    finally:
        outputs.cancel()
        inputs.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(outputs, inputs)


async def _output(
    channel: Channel[ext.ExecInput], process: Process, stream: str, chunk: int
) -> None:
    tag = STDOUT_TAG if stream == "stdout" else STDERR_TAG
    window = channel.send_window
    while True:
        # Room for a whole chunk first: output taken from the pipe must go on
        # before anything else is awaited (someone else could read it). Held only
        # once there is output: a quiet stream takes no room from a busy one.
        await process.output_ready(stream)
        await window.hold(chunk)
        output = await process.next_output(stream, chunk)
        if isinstance(output, InPipe):
            channel.send_data_from_pipe(tag, output.fd, output.size)
            sent = output.size
        elif output:
            channel.send_data(tag, output)
            sent = len(output)
        else:
            window.sent(chunk, 0)
            return
        # (The client may acknowledge only what was sent: not the room held for it.)
        window.sent(chunk, sent)


async def _inputs(channel: Channel[ext.ExecInput], process: Process) -> None:
    """stdin, its end, resizes, signals and acks, until the client closes its side.
    Closing before the exit status kills the process (see run)."""
    try:
        while True:
            message = await channel.recv()
            if message is None:
                break
            await _take(channel, process, message)
    except Exception as exc:
        channel.send_window.close(exc)
        raise
    if not process.exited:
        process.signal(signals.SIGKILL)
    channel.send_window.close(InvalidArgument("the client closed the stream"))


async def _take(channel: Channel[ext.ExecInput], process: Process, message: ext.ExecInput) -> None:
    if message.stdin:  # (its ack, and the window, were taken by the channel)
        if not process.exited:
            await process.write_stdin(message.stdin)
        channel.consumed(len(message.stdin), lambda ack: ext.ExecOutput(stdin_ack=ack))
    if message.stdin_eof:
        await process.close_stdin()
    if message.HasField("resize"):
        process.resize(message.resize.rows, message.resize.columns)
    if message.signal:
        if not 0 < message.signal < signals.NSIG:
            raise InvalidArgument(f"signal {message.signal} is not a valid signal number")
        process.signal(message.signal)
