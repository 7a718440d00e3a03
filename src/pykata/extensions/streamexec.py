"""The client end of Exec: a process in a container on one stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ..api import extensions_pb2 as ext
from ..api import oci_pb2
from ..ttrpc.client import Metadata
from .client import Channel, Extensions, Piece, ProtocolError
from .wire import data_tag

STDIN_TAG = data_tag(ext.ExecInput, "stdin")


class ExecSession:
    """A running process: write its stdin, read its output, then its exit status.

    >>> session = await ExecSession.start(extensions, "c1", process)
    >>> async for stream, data in session.output():   # ("stdout" | "stderr", bytes-like)
    ...     ...
    >>> session.exit_status
    """

    def __init__(self, channel: Channel[ext.ExecOutput | Piece], exec_id: str, chunk: int) -> None:
        self.channel = channel
        self.exec_id = exec_id
        self.chunk = chunk
        self.exit_status: int | None = None

    @classmethod
    async def start(
        cls,
        extensions: Extensions,
        container_id: str,
        process: oci_pb2.Process,
        exec_id: str = "",
        *,
        metadata: Metadata | None = None,
    ) -> ExecSession:
        """Run `process`; raises TtrpcError if the agent cannot (its status and reason)."""
        caps = await extensions.require("Exec")
        channel = await extensions.open_data("Exec", ext.ExecOutput, metadata=metadata)
        start = ext.ExecStart(container_id=container_id, exec_id=exec_id, process=process)
        channel.send(ext.ExecInput(start=start))
        try:
            first = await channel.first(ext.ExecOutput, "exec_id")
        except ProtocolError:
            channel.abort()
            raise
        return cls(channel, first.exec_id, caps.limits.max_chunk_bytes)

    async def write(self, data: bytes) -> None:
        """To its stdin, within the window (waits while the agent has not taken enough)."""
        for start in range(0, len(data), self.chunk):
            piece = data[start : start + self.chunk]
            await self.channel.send_window.reserve(len(piece))
            self.channel.send_data(STDIN_TAG, piece)

    def close_stdin(self) -> None:
        self.channel.send(ext.ExecInput(stdin_eof=True))

    def resize(self, rows: int, columns: int) -> None:
        self.channel.send(ext.ExecInput(resize=ext.WindowSize(rows=rows, columns=columns)))

    def signal(self, signum: int) -> None:
        self.channel.send(ext.ExecInput(signal=signum))

    async def output(self) -> AsyncIterator[tuple[str, bytes | memoryview]]:
        """("stdout" | "stderr", data) as it comes; then `exit_status` is set. `data`
        is bytes-like: a big piece is a memoryview of what arrived (not copied),
        valid for good. Each piece is acknowledged once the caller comes back for
        the next."""
        channel = self.channel
        try:
            while True:
                message = await channel.recv()
                if message is None:
                    await channel.finish()
                    raise ProtocolError("Exec ended before the exit status")
                data: bytes | memoryview
                if isinstance(message, Piece):  # (acks: taken by the channel)
                    stream, data = message.field, message.data
                else:
                    stream = "stdout" if message.stdout else "stderr"
                    data = message.stdout or message.stderr
                if data:
                    yield stream, data
                    channel.consumed(len(data), lambda ack: ext.ExecInput(ack=ack))
                if isinstance(message, Piece):
                    continue
                if message.exited:
                    self.exit_status = message.exit_status
                    break
            channel.close_send()
            await channel.finish()
        finally:
            channel.abort()
            channel.send_window.close(ProtocolError("the exec has ended"))
