"""The server's bounds, tried by breaking them over real unix sockets.

Each attack runs against a Server with small limits, and asserts what the
server holds (its own counters) and what every client is answered; a
well-behaved client keeps being served throughout. The same attacks against
the real agent, at its defaults, are in test_agent_limits.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pykata.api.health_pb2 import CheckRequest
from pykata.ttrpc import Client, Code, Server, ServerContext, Service, TtrpcError, UnaryMethod
from pykata.ttrpc.server import EVENTS_PER_TURN, Limits

from . import attack
from .attack import raw_socket, read_responses, send_what_fits, settled

SERVICE = "pykata.test.Limits"


class Behaviour:
    """Handlers whose calls the test can hold, count and size."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0

    async def hold(self, request: CheckRequest, ctx: ServerContext) -> CheckRequest:
        """Answers once released: `service` bytes of answer if it is a number."""
        self.started += 1
        await self.release.wait()
        size = request.service
        return CheckRequest(service="x" * int(size)) if size.isdigit() else request

    async def big(self, request: CheckRequest, ctx: ServerContext) -> CheckRequest:
        self.started += 1
        return CheckRequest(service="x" * int(request.service))

    async def echo(self, request: CheckRequest, ctx: ServerContext) -> CheckRequest:
        return request


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, **limits: float) -> AsyncIterator[tuple[Server, Behaviour, str]]:
    behaviour = Behaviour()
    service = Service(
        SERVICE,
        {
            "Hold": UnaryMethod(CheckRequest, behaviour.hold),
            "Big": UnaryMethod(CheckRequest, behaviour.big),
            "Echo": UnaryMethod(CheckRequest, behaviour.echo),
        },
    )
    server = Server([service], limits=Limits(**limits))  # type: ignore[arg-type]
    address = f"unix://{tmp_path}/limits.sock"
    await server.start(address)
    try:
        yield server, behaviour, address
    finally:
        behaviour.release.set()
        await server.shutdown(grace=1)


async def echo(client: Client, text: str = "still served") -> str:
    reply = await client.call(SERVICE, "Echo", CheckRequest(service=text), CheckRequest, timeout=10)
    return reply.service


def request(sid: int, method: str, arg: str = "") -> bytes:
    return attack.request(sid, SERVICE, method, CheckRequest(service=arg))


async def test_calls_in_flight_per_connection_and_overall(tmp_path: Path) -> None:
    """A connection gets its own limit; beyond each connection's guaranteed
    calls, all share one; every excess call is answered RESOURCE_EXHAUSTED at
    once, and held calls all finish - none is left hanging."""
    async with (
        serving(tmp_path, max_calls_per_connection=8, guaranteed_calls=2, max_calls=10) as (
            server,
            behaviour,
            address,
        ),
        await Client.connect(address) as a,
        await Client.connect(address) as b,
        await Client.connect(address) as bystander,
    ):

        def hold(client: Client) -> asyncio.Future[list[object]]:
            calls = [
                client.call(SERVICE, "Hold", CheckRequest(service=str(n)), CheckRequest)
                for n in range(20)
            ]
            return asyncio.gather(*calls, return_exceptions=True)

        held_a = hold(a)
        await settled(lambda: behaviour.started)
        held_b = hold(b)
        await settled(lambda: behaviour.started)
        assert behaviour.started == 8 + 2 + 4  # a: its 8; b: 2 guaranteed + the 4 left of 10
        assert server.stats()["calls"] == 14
        assert await echo(bystander) == "still served"  # a guaranteed call

        behaviour.release.set()
        results_a, results_b = await held_a, await held_b
    refused_a = [r for r in results_a if isinstance(r, TtrpcError)]
    refused_b = [r for r in results_b if isinstance(r, TtrpcError)]
    assert len(refused_a) == 12 and len(refused_b) == 14
    assert all(e.code == Code.RESOURCE_EXHAUSTED for e in refused_a + refused_b)
    assert all("on this connection (limit 8)" in e.message for e in refused_a)
    assert any("on the server (limit 10 beyond 2 per connection)" in e.message for e in refused_b)
    answered = [r for r in results_a + results_b if isinstance(r, CheckRequest)]
    assert len(answered) == 14


async def test_a_peer_that_does_not_read_its_answers_is_not_read_either(tmp_path: Path) -> None:
    """2,000 pipelined calls with 32 KiB answers, never read: the server stops
    taking requests once the answers back up, holding a bounded amount; the
    calls it has not taken wait in the socket, and when the peer reads at
    last, every call is answered."""
    reply, calls, high_water = 32 << 10, 2000, 256 << 10
    async with (
        serving(tmp_path, reply_high_water=high_water) as (server, behaviour, address),
        await Client.connect(address) as bystander,
    ):
        with raw_socket(address) as attacker:
            wire = b"".join(request(2 * n + 1, "Big", str(reply)) for n in range(calls))
            sent = send_what_fits(attacker, wire)
            await settled(lambda: behaviour.started)
            queued = server.stats()["queued_reply_bytes"]
            assert queued <= high_water + EVENTS_PER_TURN * (reply + 64)
            assert behaviour.started < calls // 4
            assert await echo(bystander) == "still served"

            reader = asyncio.ensure_future(read_responses(attacker, calls))
            while sent < len(wire):
                await asyncio.sleep(0.01)
                sent += send_what_fits(attacker, wire[sent:])
            answers = await reader
    assert sorted(sid for sid, _ in answers) == [2 * n + 1 for n in range(calls)]
    assert all(r.status.code == Code.OK and len(r.payload) > reply for _, r in answers)
    assert behaviour.started == calls


async def test_answers_nobody_reads_are_shed_past_the_total_bound(tmp_path: Path) -> None:
    """Slow calls with big answers, never read (the high-water mark cannot stop
    what is already running): past max_queued_replies for all connections
    together, the connection holding the most is closed. A peer that reads
    its answers is not, and gets them all."""
    answer = 64 << 10
    async with serving(tmp_path, reply_high_water=64 << 10, max_queued_replies=2 << 20) as (
        server,
        behaviour,
        address,
    ):
        loop = asyncio.get_running_loop()
        async with await Client.connect(address) as reader:
            with raw_socket(address) as attacker:
                send_what_fits(
                    attacker, b"".join(request(2 * n + 1, "Hold", str(answer)) for n in range(100))
                )
                await settled(lambda: behaviour.started)
                held = [
                    reader.call(SERVICE, "Hold", CheckRequest(service=str(answer)), CheckRequest)
                    for _ in range(10)
                ]
                gathered = asyncio.gather(*held)
                await settled(lambda: behaviour.started)
                assert behaviour.started == 110
                behaviour.release.set()
                replies = await gathered
                await settled(lambda: server.counters["connections_shed"])
                assert server.counters["connections_shed"] == 1
                received = 0
                with contextlib.suppress(ConnectionResetError):
                    while data := await loop.sock_recv(attacker, 1 << 16):
                        received += len(data)
                assert received < 100 * answer  # closed before its answers were all there
            assert all(len(r.service) == answer for r in replies)
            assert await echo(reader) == "still served"
            assert server.stats()["queued_reply_bytes"] == 0


async def test_incomplete_frames_share_a_bounded_room(tmp_path: Path) -> None:
    """Twenty peers each begin a 2 MiB request and pause: only as many as the
    shared room holds get room for their frame, the others wait holding no
    more than their guaranteed bytes; small calls go on meanwhile. When they
    send the rest, every one of them is answered in turn: holding room, a
    frame can always finish, so nobody waits on anybody for ever."""
    guaranteed, room, peers = 4 << 10, (4 << 20) + (64 << 10), 20
    payload = "z" * (2 << 20)
    async with serving(tmp_path, guaranteed_frame_bytes=guaranteed, max_frame_bytes=room) as (
        server,
        _,
        address,
    ):
        async with await Client.connect(address) as bystander:
            with contextlib.ExitStack() as stack:
                socks = [stack.enter_context(raw_socket(address)) for _ in range(peers)]
                frame = request(1, "Echo", payload)
                sent = [send_what_fits(sock, frame[: 100 << 10]) for sock in socks]
                await settled(lambda: server.stats()["frame_bytes"])
                stats = server.stats()
                per_frame = len(frame) - guaranteed
                assert stats["frame_bytes_reserved"] == 2 * per_frame <= room
                assert stats["frame_bytes"] <= 2 * len(frame) + peers * (guaranteed + 1)
                assert await echo(bystander) == "still served"

                answers = [asyncio.ensure_future(read_responses(sock, 1)) for sock in socks]
                while any(n < len(frame) for n in sent):
                    for i, sock in enumerate(socks):
                        sent[i] += send_what_fits(sock, frame[sent[i] :])
                    await asyncio.sleep(0.005)
                for answer in answers:
                    [(_sid, response)] = await answer
                    assert response.status.code == Code.OK
                    assert CheckRequest.FromString(response.payload).service == payload
        stats = server.stats()
        assert stats["frame_bytes"] == stats["frame_bytes_reserved"] == 0


async def test_a_frame_that_never_ends_closes_its_connection(tmp_path: Path) -> None:
    """Slowloris: part of a header, or a frame trickled a byte at a time -
    the frame's deadline closes the connection; others are served."""
    async with serving(tmp_path, frame_timeout=0.3) as (server, _, address):
        loop = asyncio.get_running_loop()
        async with await Client.connect(address) as bystander:
            with raw_socket(address) as half_header, raw_socket(address) as trickle:
                half_header.send(b"\0\0\0")
                frame = request(1, "Echo", "slow")
                closed = asyncio.ensure_future(loop.sock_recv(half_header, 1))
                for byte in frame[:-1]:
                    trickle.send(bytes([byte]))
                    await asyncio.sleep(0.02)
                    if closed.done():
                        break
                assert await closed == b""
                with contextlib.suppress(ConnectionResetError):
                    assert await loop.sock_recv(trickle, 1) == b""
            assert await echo(bystander) == "still served"
        assert server.counters["frame_timeouts"] == 2


async def test_connections_beyond_the_limit_are_closed_at_once(tmp_path: Path) -> None:
    async with serving(tmp_path, max_connections=5) as (server, _, address):
        loop = asyncio.get_running_loop()
        async with await Client.connect(address) as bystander:
            with contextlib.ExitStack() as stack:
                socks = [stack.enter_context(raw_socket(address)) for _ in range(10)]
                await settled(lambda: server.counters["connections_refused"])
                ends = await asyncio.gather(
                    *(asyncio.wait_for(loop.sock_recv(s, 1), 0.5) for s in socks),
                    return_exceptions=True,
                )
                closed = [end for end in ends if end == b""]
                assert len(closed) == 6 and server.counters["connections_refused"] == 6
                assert server.stats()["connections"] == 5
                assert await echo(bystander) == "still served"
            await settled(lambda: server.stats()["connections"])
            async with await Client.connect(address) as later:
                assert await echo(later) == "still served"


async def test_warnings_about_a_peer_are_rate_limited_named_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """2,000 bad frames: every one is answered, but only a burst of warnings
    is logged, each naming the peer's pid and uid; the others are counted in
    `suppressed` fields, so the log still accounts for all 2,000."""
    caplog.set_level(logging.WARNING, logger="pykata.ttrpc")
    bad = 2000
    async with serving(tmp_path, peer_log_burst=5, peer_log_rate=0.5) as (_, _, address):
        with raw_socket(address) as attacker:
            wire = b"".join(request(2 * n + 2, "Echo") for n in range(bad))  # even ids
            reader = asyncio.ensure_future(read_responses(attacker, bad))
            sent = 0
            while sent < len(wire):
                sent += send_what_fits(attacker, wire[sent:])
                await asyncio.sleep(0.001)
            answers = await reader
    assert all(r.status.code == Code.INVALID_ARGUMENT for _, r in answers)
    records = [r for r in caplog.records if r.name == "pykata.ttrpc.server"]
    assert len(records) <= 5 + 2  # the burst, and the count lines
    assert all(r.peer_pid == os.getpid() for r in records)
    assert all(r.peer_uid == os.getuid() for r in records)
    logged = sum(1 for r in records if r.getMessage().startswith("stream rejected"))
    counted = sum(getattr(r, "suppressed", 0) for r in records)
    assert logged + counted == bad
