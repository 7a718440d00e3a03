"""The ttRPC relay: many clients over one upstream connection (what a serial port allows).

A real server on a real unix socket stands upstream; clients are real
clients on the relay's socket. The guest VM tests use the same relay.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pykata.transport import TransportError
from pykata.ttrpc import Client, Code, Server, TtrpcError
from pykata.ttrpc.frame import HEADER, MAX_DATA_SIZE
from pykata.ttrpc.relay import Relay, RelayThread, StreamMap

from .test_ttrpc import SERVICE, call, peer_service


def test_stream_map_keeps_clients_apart() -> None:
    streams = StreamMap()
    a, b = object(), object()
    assert streams.outbound(a, 1) == 1
    assert streams.outbound(b, 1) == 3  # the same id from another client: a new stream
    assert streams.outbound(a, 1) == 1  # more frames of a's stream 1
    assert streams.inbound(3, final=False) == (b, 1)
    assert streams.inbound(3, final=True) == (b, 1)
    assert streams.inbound(3, final=True) is None  # answered: freed
    streams.forget(a)
    assert streams.inbound(1, final=True) is None  # a left: its answer goes nowhere
    assert len(streams) == 0


class Upstream:
    """A server that counts its connections: the relay must use exactly one."""

    def __init__(self) -> None:
        self.server = Server([peer_service()])
        self.connections = 0

    async def start(self, path: str) -> None:
        def counted() -> asyncio.Protocol:
            self.connections += 1
            return self.server.connection_protocol()

        await asyncio.get_running_loop().create_unix_server(counted, path)


@pytest.fixture
async def relayed(tmp_path: Path) -> AsyncIterator[tuple[str, Upstream]]:
    upstream = Upstream()
    await upstream.start(f"{tmp_path}/up.sock")
    relay = Relay()
    await relay.start(f"unix://{tmp_path}/up.sock", f"unix://{tmp_path}/relay.sock")
    yield f"unix://{tmp_path}/relay.sock", upstream
    relay.close()
    await upstream.server.shutdown(grace=1)


async def test_clients_share_one_upstream_connection(relayed: tuple[str, Upstream]) -> None:
    address, upstream = relayed
    async with await Client.connect(address) as a, await Client.connect(address) as b:
        # Both number their first stream 1; the slow one must not get the fast answer.
        slow = asyncio.ensure_future(call(a, "Sleep", "0.4"))
        fast = await call(b, "Sleep", "0")
        assert fast.service == "0" and not slow.done()
        assert (await slow).service == "0.4"
    assert upstream.connections == 1


async def test_a_departed_clients_answer_reaches_no_one(relayed: tuple[str, Upstream]) -> None:
    address, _ = relayed
    leaving = await Client.connect(address)
    pending = asyncio.ensure_future(call(leaving, "Sleep", "0.2"))
    await asyncio.sleep(0.05)
    await leaving.close()
    with pytest.raises(TtrpcError):
        await pending
    async with await Client.connect(address) as staying:
        # Its stream 1 is in flight when the departed client's answer arrives.
        assert (await call(staying, "Sleep", "0.5")).service == "0.5"


async def test_streams_and_errors_pass_through(relayed: tuple[str, Upstream]) -> None:
    address, _ = relayed
    async with await Client.connect(address) as client:
        stream = client.stream(SERVICE, "Sum")
        for n in (1, 2, 3):
            stream.send(str(n).encode())
        stream.close_send()
        assert [m async for m in _messages(stream)] == [b"1", b"3", b"6"]
        assert await stream.response() == b"total=6"
        with pytest.raises(TtrpcError) as failed:
            await call(client, "Fail")
        assert failed.value.code != Code.OK


async def _messages(stream: object) -> AsyncIterator[bytes]:
    while (message := await stream.recv()) is not None:  # type: ignore[attr-defined]
        yield message


async def test_an_oversize_frame_is_refused_and_the_relay_goes_on(
    relayed: tuple[str, Upstream],
) -> None:
    address, _ = relayed
    path = address.removeprefix("unix://")
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX) as raw:
        raw.setblocking(False)
        await loop.sock_connect(raw, path)
        await loop.sock_sendall(raw, HEADER.pack(MAX_DATA_SIZE + 1, 1, 1, 0))
        reply = await asyncio.wait_for(loop.sock_recv(raw, 4096), 5)
        assert b"exceeds maximum message size" in reply
    async with await Client.connect(address) as client:
        assert (await call(client, "Sleep", "0")).service == "0"


async def test_the_clients_go_when_the_upstream_goes(tmp_path: Path) -> None:
    # An upstream that takes the call and then vanishes without answering (a guest
    # powered off mid-call).
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    await asyncio.start_unix_server(silent, f"{tmp_path}/up.sock")
    relay = Relay()
    await relay.start(f"unix://{tmp_path}/up.sock", f"unix://{tmp_path}/relay.sock")
    async with await Client.connect(f"unix://{tmp_path}/relay.sock") as client:
        pending = asyncio.ensure_future(call(client, "Sleep", "5"))
        await asyncio.sleep(0.1)
        accepted[0].close()
        with pytest.raises(TtrpcError) as lost:
            await pending
        assert lost.value.code == Code.UNAVAILABLE
    await asyncio.wait_for(relay.closed.wait(), 5)
    assert not (tmp_path / "relay.sock").exists()


def test_a_relay_that_cannot_start_says_why(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match=r"cannot connect to unix://.*/up\.sock"):
        RelayThread(f"unix://{tmp_path}/up.sock", f"unix://{tmp_path}/relay.sock")
