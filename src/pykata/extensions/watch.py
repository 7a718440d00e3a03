"""The client end of Watch: changes under a path in a container, as they happen."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ..api import extensions_pb2 as ext
from .client import Extensions, ProtocolError


async def watch(
    extensions: Extensions, location: ext.FileLocation, *, recursive: bool = False
) -> AsyncIterator[tuple[list[ext.FileEvent], int]]:
    """(events, how many were lost before them) as they come, until the caller stops.
    Each batch is acknowledged when the caller comes back for the next (a batch
    counts as its number of events, at least one)."""
    await extensions.require("Watch")
    channel = await extensions.open("Watch", ext.WatchOutput)
    channel.send(ext.WatchInput(open=ext.WatchOpen(location=location, recursive=recursive)))
    try:
        await channel.first(ext.WatchOutput, "ready")
        yield [], 0  # the watch is in place
        while True:
            message = await channel.recv()
            if message is None:
                await channel.finish()
                raise ProtocolError("Watch ended by itself")
            yield list(message.events), message.lost
            channel.send(ext.WatchInput(ack=max(1, len(message.events))))
    finally:
        channel.abort()
