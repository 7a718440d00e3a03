"""Polling after an answer (ttrpc.busypoll): the same answers, and no polling when idle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvloop

from pykata.api.health_pb2 import CheckRequest
from pykata.ttrpc import Client, ClientStream, Server
from pykata.ttrpc.busypoll import BusyPoll

from .test_ttrpc import SERVICE, peer_service

WINDOW = 0.002  # 2 ms: wide, so that these checks do not depend on the machine's speed


async def test_a_window_opens_after_an_answer_and_closes_by_itself() -> None:
    poll = BusyPoll(asyncio.get_running_loop(), WINDOW)
    assert not poll.spinning
    poll.answered()
    assert poll.spinning
    await asyncio.sleep(WINDOW * 10)
    assert not poll.spinning  # idle again: the loop sleeps


async def test_no_window_when_off_or_when_the_peer_came_back_late() -> None:
    off = BusyPoll(asyncio.get_running_loop(), 0)
    off.answered()
    assert not off.spinning
    poll = BusyPoll(asyncio.get_running_loop(), WINDOW)
    poll.answered()
    await asyncio.sleep(WINDOW * 10)  # the next request came long after the window
    poll.received()
    poll.answered()
    assert not poll.spinning  # polling would not have caught it: not again
    poll.received()  # this one came at once
    poll.answered()
    assert poll.spinning  # so the next answer polls again
    poll.close()
    assert not poll.spinning


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_calls_get_the_same_answers_with_polling_and_it_stops_when_idle(
    tmp_path: Path, loop: str
) -> None:
    async def main() -> None:
        server = Server([peer_service()], busy_poll=WINDOW)
        await server.start(f"unix://{tmp_path}/s.sock")
        async with await Client.connect(f"unix://{tmp_path}/s.sock") as client:
            for n in range(50):  # sequential: each request comes while polling
                # "0e{n}": sleep 0 s, and each answer is told apart
                request = CheckRequest(service=f"0e{n}")
                reply = await client.call(SERVICE, "Sleep", request, CheckRequest)
                assert reply.service == f"0e{n}"
            replies = await asyncio.gather(
                *(
                    client.call(SERVICE, "Sleep", CheckRequest(service=f"0e{n}"), CheckRequest)
                    for n in range(100)
                )
            )
            assert [r.service for r in replies] == [f"0e{n}" for n in range(100)]
            stream = client.stream(SERVICE, "Sum")
            for n in (1, 2, 3):
                stream.send(str(n).encode())
            stream.close_send()
            partials = [m async for m in _messages(stream)]
            assert partials == [b"1", b"3", b"6"]
            assert await stream.response() == b"total=6"
        [poll] = server._busy_polls.values()
        assert poll.windows > 0
        await asyncio.sleep(WINDOW * 10)
        assert not poll.spinning  # no calls: nothing keeps the loop awake
        await server.shutdown(grace=1)

    if loop == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())


def test_a_negative_window_is_refused() -> None:
    with pytest.raises(ValueError, match="busy_poll"):
        Server([], busy_poll=-1)


async def _messages(stream: ClientStream) -> AsyncIterator[bytes]:
    while (message := await stream.recv()) is not None:
        yield message
