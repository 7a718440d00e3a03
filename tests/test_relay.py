"""The ttRPC relay: many clients over one upstream connection (what a serial port allows).

A real server on a real unix socket stands upstream; clients are real
clients on the relay's socket. The guest VM tests use the same relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pykata.api.health_pb2 import CheckRequest
from pykata.transport import TransportError
from pykata.ttrpc import Client, Code, Server, TtrpcError
from pykata.ttrpc.frame import HEADER, MAX_DATA_SIZE
from pykata.ttrpc.protocol import ClientConnection
from pykata.ttrpc.relay import Relay, RelayLimits, RelayThread, StreamMap

from .extensions import eventually
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


@contextlib.asynccontextmanager
async def relay_to_peer(
    tmp_path: Path, limits: RelayLimits | None = None
) -> AsyncIterator[tuple[str, Upstream, Relay]]:
    upstream = Upstream()
    await upstream.start(f"{tmp_path}/up.sock")
    relay = Relay(limits)
    await relay.start(f"unix://{tmp_path}/up.sock", f"unix://{tmp_path}/relay.sock")
    try:
        yield f"unix://{tmp_path}/relay.sock", upstream, relay
    finally:
        relay.close()
        await upstream.server.shutdown(grace=1)


@pytest.fixture
async def relayed(tmp_path: Path) -> AsyncIterator[tuple[str, Upstream]]:
    async with relay_to_peer(tmp_path) as (address, upstream, _):
        yield address, upstream


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


# --- the relay's bounds: one client that misbehaves costs only itself -------------------


async def _raw(address: str) -> socket.socket:
    raw = socket.socket(socket.AF_UNIX)
    raw.setblocking(False)
    await asyncio.get_running_loop().sock_connect(raw, address.removeprefix("unix://"))
    return raw


async def test_clients_beyond_the_limit_are_closed_and_the_others_served(tmp_path: Path) -> None:
    limited = relay_to_peer(tmp_path, RelayLimits(max_clients=2))
    async with limited as (address, _, relay), await Client.connect(address) as a:
        async with await Client.connect(address) as b:
            assert (await call(b, "Sleep", "0")).service == "0"
            with await _raw(address) as refused:
                loop = asyncio.get_running_loop()
                assert await asyncio.wait_for(loop.sock_recv(refused, 1), 5) == b""
            assert (await call(a, "Sleep", "0")).service == "0"
        await eventually(lambda: len(relay.clients) == 1)  # b's leaving reaches the relay
        async with await Client.connect(address) as c:
            assert (await call(c, "Sleep", "0")).service == "0"


async def test_too_many_calls_from_one_client_are_refused_to_it_alone(tmp_path: Path) -> None:
    limited = relay_to_peer(tmp_path, RelayLimits(max_calls_per_client=2))
    async with (
        limited as (address, _, relay),
        await Client.connect(address) as a,
        await Client.connect(address) as b,
    ):
        held = [asyncio.ensure_future(call(a, "Sleep", "1")) for _ in range(2)]
        await eventually(lambda: len(relay.streams) == 2)  # both reached the relay
        with pytest.raises(TtrpcError) as refused:
            await call(a, "Sleep", "0")
        assert refused.value.code == Code.RESOURCE_EXHAUSTED
        assert "too many calls in flight through the relay (limit 2)" in str(refused.value)
        assert [(await call(b, "Sleep", "0")).service for _ in range(3)] == ["0"] * 3
        assert [r.service for r in await asyncio.gather(*held)] == ["1"] * 2
        assert (await call(a, "Sleep", "0")).service == "0"  # its calls ended: room again


async def test_a_client_that_never_reads_is_closed_and_the_others_served(tmp_path: Path) -> None:
    limits = RelayLimits(reply_high_water=64 << 10, max_unread_bytes=1 << 20)
    async with relay_to_peer(tmp_path, limits) as (address, _, relay):
        loop = asyncio.get_running_loop()
        # 16 calls of 256 KiB each, all read by the relay before the first is answered
        # ("0.3000...": sleep 0.3 s, then echo the whole request back).
        echo = CheckRequest(service="0.3" + "0" * (256 << 10)).SerializeToString()
        connection = ClientConnection()
        requests = b"".join(connection.request(SERVICE, "Sleep", echo)[1] for _ in range(16))
        with await _raw(address) as greedy:
            await loop.sock_sendall(greedy, requests)
            async with await Client.connect(address) as polite:
                assert (await call(polite, "Sleep", "0")).service == "0"
                # The answers come back; greedy reads none and is closed.
                await eventually(lambda: len(relay.clients) == 1)
                assert (await call(polite, "Sleep", "0")).service == "0"
            received = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := await asyncio.wait_for(loop.sock_recv(greedy, 1 << 20), 5):
                    received += len(chunk)
            assert received < 16 * len(echo)  # what the kernel held, not all 4 MiB


async def test_an_upstream_that_does_not_read_stops_the_clients_not_the_relays_memory(
    tmp_path: Path,
) -> None:
    stuck: list[asyncio.StreamWriter] = []

    async def never_reads(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stuck.append(writer)

    await asyncio.start_unix_server(never_reads, f"{tmp_path}/up.sock")
    relay = Relay(RelayLimits(upstream_high_water=64 << 10))
    await relay.start(f"unix://{tmp_path}/up.sock", f"unix://{tmp_path}/relay.sock")
    try:
        loop = asyncio.get_running_loop()
        payload = CheckRequest(service="0" * (1 << 20)).SerializeToString()
        connection = ClientConnection()
        with await _raw(f"unix://{tmp_path}/relay.sock") as client:
            sent = 0
            with contextlib.suppress(TimeoutError):
                while sent < 64 << 20:
                    frame = connection.request(SERVICE, "Sleep", payload)[1]
                    await asyncio.wait_for(loop.sock_sendall(client, frame), 1)
                    sent += len(frame)
            assert sent < 64 << 20  # the client was made to wait
            assert relay.upstream_full
            upstream = relay._upstream
            assert upstream is not None
            # Past the mark by at most what one read from the client brought in.
            assert upstream.get_write_buffer_size() <= (64 << 10) + (2 << 20)
    finally:
        relay.close()
