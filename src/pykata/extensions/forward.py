"""The client end of PortForward: one local connection carried to a port in
the sandbox, bytes both ways, half-close, flow control."""

from __future__ import annotations

import asyncio
import contextlib

from ..api import extensions_pb2 as ext
from .client import Channel, Extensions, Piece, ProtocolError
from .wire import data_tag

DATA_TAG = data_tag(ext.ForwardMessage, "data")


async def forward(
    extensions: Extensions,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    target: ext.ForwardTarget,
) -> None:
    """Carry one local connection to `target` until both sides have ended.
    Raises TtrpcError when the agent fails the forward (e.g. UNAVAILABLE: refused)."""
    caps = await extensions.require("PortForward")
    channel = await extensions.open_data("PortForward", ext.ForwardMessage)
    channel.send(ext.ForwardMessage(open=target))
    await channel.first(ext.ForwardMessage, "opened")
    writer.transport.set_write_buffer_limits(high=caps.limits.max_chunk_bytes)
    up = asyncio.ensure_future(_local_to_agent(channel, reader, caps.limits.max_chunk_bytes))
    try:
        await _agent_to_local(channel, writer, up)
        await up
        await channel.finish()
    finally:
        channel.abort()
        up.cancel()
        with contextlib.suppress(BaseException):
            await up


async def _local_to_agent(
    channel: Channel[ext.ForwardMessage | Piece], reader: asyncio.StreamReader, chunk: int
) -> None:
    while True:
        data = await reader.read(chunk)
        if not data:
            channel.send(ext.ForwardMessage(eof=True))
            return
        await channel.send_window.reserve(len(data))
        channel.send_data(DATA_TAG, data)


async def _agent_to_local(
    channel: Channel[ext.ForwardMessage | Piece],
    writer: asyncio.StreamWriter,
    up: asyncio.Future[None],
) -> None:
    """Until the call ends. Once both sides have sent their eof, our side of the
    stream is closed, and the agent ends the call."""
    agent_eof = closed = False

    def close_when_both_ended(_: object = None) -> None:
        nonlocal closed
        if agent_eof and up.done() and not up.cancelled() and not closed:
            closed = True
            channel.close_send()

    up.add_done_callback(close_when_both_ended)
    while True:
        message = await channel.recv()
        if message is None:
            if not agent_eof:
                await channel.finish()
                raise ProtocolError("PortForward ended before the agent's eof")
            return
        data = message.data  # (its ack, and the window, were taken by the channel)
        if data:
            writer.write(data)
            await writer.drain()
            channel.consumed(len(data), lambda ack: ext.ForwardMessage(ack=ack))
        if isinstance(message, Piece):
            continue
        if message.eof and not agent_eof:
            agent_eof = True
            if writer.can_write_eof():
                writer.write_eof()
            close_when_both_ended()
