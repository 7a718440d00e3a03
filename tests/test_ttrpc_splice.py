"""Stream data sent from a pipe (ServerStream.send_from_pipe): spliced into the
socket while the connection can take it, queued in order when it cannot, and
never a cut frame - over real unix sockets, with a real client."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pykata.api.health_pb2 import CheckRequest
from pykata.ttrpc import (
    Client,
    Code,
    Server,
    ServerContext,
    ServerStream,
    Service,
    StreamMethod,
    TtrpcError,
    UnaryMethod,
)

SERVICE = "pykata.test.Pipe"
MiB = 1 << 20
F_SETPIPE_SZ = 1031


async def pieces(stream: ServerStream, ctx: ServerContext) -> bytes:
    """Each request names a piece's size (and, after a "+", bytes to promise beyond
    it); the piece - random bytes - goes from a pipe after a message naming its digest."""
    read, write = os.pipe()
    fcntl.fcntl(write, F_SETPIPE_SZ, MiB)
    os.set_blocking(read, False)
    try:
        while (request := await stream.recv()) is not None:
            size, _, beyond = request.decode().partition("+")
            piece = os.urandom(int(size))
            os.write(write, piece)
            stream.send(hashlib.sha256(b"H" + piece).hexdigest().encode())
            stream.send_from_pipe(b"H", read, int(size) + int(beyond or 0))
        return b"done"
    finally:
        os.close(read)
        os.close(write)


async def sleep_echo(request: CheckRequest, ctx: ServerContext) -> CheckRequest:
    await asyncio.sleep(float(request.service or 0))
    return request


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    service = Service(
        SERVICE,
        {"Pieces": StreamMethod(pieces), "Sleep": UnaryMethod(CheckRequest, sleep_echo)},
    )
    server = Server([service])
    yield server
    await server.shutdown(grace=1)


@pytest.fixture
async def address(server: Server, tmp_path: Path) -> str:
    await server.start(f"unix://{tmp_path}/s.sock")
    return f"unix://{tmp_path}/s.sock"


async def test_pieces_arrive_whole_and_in_order_whether_spliced_or_queued(
    server: Server, address: str
) -> None:
    sizes = [MiB, 1, 4096, MiB - 1, 65536, MiB, MiB, 7] * 3
    async with await Client.connect(address) as client:
        stream = client.stream(SERVICE, "Pieces")
        for size in sizes:
            stream.send(str(size).encode())
        stream.close_send()
        # Not reading for a while: the socket fills, and the rest must queue in order.
        await asyncio.sleep(0.3)
        # A call on the same connection meanwhile gets its own answer.
        reply = await client.call(SERVICE, "Sleep", CheckRequest(service="0"), CheckRequest)
        assert reply.service == "0"
        received = []
        while (message := await stream.recv()) is not None:
            received.append(bytes(message))
        assert await stream.response() == b"done"
    assert [len(m) for m in received[1::2]] == [1 + size for size in sizes]
    digests = [hashlib.sha256(m).hexdigest().encode() for m in received[1::2]]
    assert received[0::2] == digests
    stats = server.stats()
    assert stats["pipe_bytes_spliced"] + stats["pipe_bytes_copied"] == sum(sizes)
    # Both ways were taken: spliced while the socket had room, copied once it had none.
    assert stats["pipe_bytes_spliced"] > 0 and stats["pipe_bytes_copied"] > 0


async def test_a_reading_client_gets_the_bytes_spliced(server: Server, address: str) -> None:
    async with await Client.connect(address) as client:
        stream = client.stream(SERVICE, "Pieces")
        for _ in range(32):
            stream.send(b"65536")
            digest = await stream.recv()
            piece = await stream.recv() or b""
            assert len(piece) == 65537 and hashlib.sha256(piece).hexdigest().encode() == digest
        stream.close_send()
        assert await stream.recv() is None
    stats = server.stats()
    assert stats["pipe_bytes_spliced"] == 32 * 65536 and stats["pipe_bytes_copied"] == 0


async def test_the_send_buffer_is_raised_only_while_a_call_splices(
    server: Server, address: str
) -> None:
    # A raised buffer is kernel memory a peer that stops reading can pin: it
    # lasts as long as the call that needed it, not as long as the connection.
    async with await Client.connect(address) as client:
        stream = client.stream(SERVICE, "Pieces")
        stream.send(str(MiB).encode())
        await stream.recv()
        assert len(await stream.recv() or b"") == MiB + 1
        assert server.stats()["raised_send_buffers"] == 1
        stream.close_send()
        assert await stream.response() == b"done"
        await asyncio.sleep(0)
        assert server.stats()["raised_send_buffers"] == 0
        [conn] = server._connections
        assert conn._socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < MiB


async def test_bytes_promised_beyond_the_pipe_close_the_connection_not_the_server(
    server: Server, address: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "pykata.ttrpc.server")
    async with await Client.connect(address) as client:
        stream = client.stream(SERVICE, "Pieces")
        stream.send(b"100+50")
        with pytest.raises(TtrpcError) as exc:
            while await stream.recv() is not None:
                pass
            await stream.response()
        assert exc.value.code == Code.UNAVAILABLE
    assert "a frame promised 150 bytes from a pipe that held 100" in caplog.text
    async with await Client.connect(address) as client:
        reply = await client.call(SERVICE, "Sleep", CheckRequest(service="0"), CheckRequest)
        assert reply.service == "0"
