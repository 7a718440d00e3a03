"""Random and mutated frames against a real server on a real socket.

The server runs in its own thread and event loop; each example opens a
connection, sends the bytes, closes its sending side and reads until the
server closes. Properties: the server never hangs on the connection, every
byte it sends back is a well-formed response, and a bystander connection
keeps being served.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykata.agent.serving import health_service
from pykata.api.health_pb2 import CheckRequest, HealthCheckResponse
from pykata.ttrpc import Server
from pykata.ttrpc.frame import HEADER, MAX_DATA_SIZE, FrameDecoder, MessageType, encode_frame
from pykata.ttrpc.ttrpc_pb2 import Request, Response


class ServerThread:
    """A Server on its own loop; a failure inside is kept and re-raised on stop."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None
        self.loop.set_exception_handler(self._loop_error)
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        self.error = context.get("exception") or RuntimeError(str(context["message"]))  # type: ignore[assignment]

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = Server([health_service()])
        self.loop.run_until_complete(self.server.start(self.address))
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> ServerThread:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.shutdown(grace=1), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if self.error is not None:
            raise self.error


@pytest.fixture(scope="module")
def server_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("fuzz") / "agent.sock"
    with ServerThread(f"unix://{path}"):
        yield path


def check_frame(sid: int) -> bytes:
    body = Request(
        service="grpc.Health", method="Check", payload=CheckRequest().SerializeToString()
    ).SerializeToString()
    return encode_frame(sid, MessageType.REQUEST, 0, body)


def read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def assert_well_formed_responses(data: bytes) -> None:
    decoder = FrameDecoder()
    for frame in decoder.feed(data):
        assert frame.type == MessageType.RESPONSE
        Response.FromString(frame.data)  # raises if not a Response
    assert decoder.at_frame_boundary(), "server sent a truncated frame"


valid_frames = st.one_of(
    st.builds(check_frame, st.integers(0, 40)),
    st.builds(
        lambda sid, flags, data: encode_frame(sid, MessageType.DATA, flags, data),
        st.integers(0, 40),
        st.integers(0, 7),
        st.binary(max_size=40),
    ),
)
random_frames = st.builds(
    lambda length, sid, type_, flags, data: HEADER.pack(length, sid, type_, flags) + data,
    st.one_of(st.integers(0, 64), st.just(MAX_DATA_SIZE + 1), st.integers(0, 2**32 - 1)),
    st.integers(0, 2**32 - 1),
    st.integers(0, 255),
    st.integers(0, 255),
    st.binary(max_size=64),
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(b"".join(draw(st.lists(valid_frames, min_size=1, max_size=5))))
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "flip":
            data[pos] ^= draw(st.integers(1, 255))
        elif action == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[pos]
    return bytes(data)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(mutated(), st.lists(random_frames, max_size=4).map(b"".join), st.binary(max_size=200))
)
def test_garbage_never_crashes_or_hangs_the_server(server_path: Path, garbage: bytes) -> None:
    with socket.socket(socket.AF_UNIX) as bystander, socket.socket(socket.AF_UNIX) as victim:
        bystander.settimeout(5)
        victim.settimeout(5)
        bystander.connect(str(server_path))
        victim.connect(str(server_path))
        victim.sendall(garbage)
        victim.shutdown(socket.SHUT_WR)
        try:
            answer = read_until_closed(victim)  # times out (fails) if the server hangs
        except ConnectionResetError:
            answer = b""
        assert_well_formed_responses(answer)
        bystander.sendall(check_frame(1))
        [frame] = FrameDecoder().feed(bystander.recv(65536))
        reply = HealthCheckResponse.FromString(Response.FromString(frame.data).payload)
        assert reply.status == HealthCheckResponse.SERVING


def test_oversize_then_valid_request_on_one_connection(server_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(server_path))
        sock.sendall(HEADER.pack(MAX_DATA_SIZE + 10, 1, 1, 0) + b"\0" * (MAX_DATA_SIZE + 10))
        sock.sendall(check_frame(3))
        decoder = FrameDecoder()
        frames: list = []
        while len(frames) < 2:
            frames += decoder.feed(sock.recv(65536))
        first, second = (Response.FromString(f.data) for f in frames)
        assert (frames[0].stream_id, first.status.code) == (1, 8)
        assert (frames[1].stream_id, second.status.code) == (3, 0)
