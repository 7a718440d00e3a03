"""Raw ttRPC peers for attacks: frames written without waiting, answers read
in bulk, and what a process holds (for bounds asserted on a real agent)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from google.protobuf.message import Message

from pykata.ttrpc.frame import FrameDecoder, MessageType, encode_frame
from pykata.ttrpc.ttrpc_pb2 import Request, Response


def request(sid: int, service: str, method: str, payload: Message | bytes = b"") -> bytes:
    data = payload if isinstance(payload, bytes) else payload.SerializeToString()
    body = Request(service=service, method=method, payload=data).SerializeToString()
    return encode_frame(sid, MessageType.REQUEST, 0, body)


@contextlib.contextmanager
def raw_socket(address: str) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(address.removeprefix("unix://"))
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def send_what_fits(sock: socket.socket, data: bytes) -> int:
    """Write as much as the kernel takes now (an attacker never waits)."""
    sent = 0
    with contextlib.suppress(BlockingIOError):
        while sent < len(data):
            sent += sock.send(data[sent : sent + 65536])
    return sent


async def send_all(sock: socket.socket, data: bytes) -> None:
    """Write it all, yielding to the loop whenever the kernel is full."""
    sent = 0
    while sent < len(data):
        sent += send_what_fits(sock, data[sent:])
        if sent < len(data):
            await asyncio.sleep(0.002)


async def read_responses(
    sock: socket.socket, count: int, timeout: float = 60
) -> list[tuple[int, Response]]:
    loop = asyncio.get_running_loop()
    decoder = FrameDecoder()
    frames: list[tuple[int, Response]] = []
    while len(frames) < count:
        data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), timeout)
        assert data, f"connection closed after {len(frames)} of {count} answers"
        for frame in decoder.feed(data):
            frames.append((frame.stream_id, Response.FromString(frame.data)))
    return frames


async def closed_by_peer(sock: socket.socket) -> bool:
    """Read until the other side closes; True then (False never: waits instead)."""
    loop = asyncio.get_running_loop()
    try:
        while await loop.sock_recv(sock, 1 << 16):
            pass
    except ConnectionResetError:
        pass
    return True


async def settled(value: object, *, rounds: int = 5, interval: float = 0.05) -> None:
    """Let things run until `value()` stops changing (a wait, never an assertion)."""
    get = value if callable(value) else (lambda: value)
    last, same = get(), 0
    while same < rounds:
        await asyncio.sleep(interval)
        now = get()
        same = same + 1 if now == last else 0
        last = now


async def until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Let things run until `condition()` holds (a bound for "never", not a measurement)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


class Answers:
    """Reads every answer arriving on a socket, in the background."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received: list[tuple[int, Response]] = []
        self.closed = False
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        decoder = FrameDecoder()
        with contextlib.suppress(ConnectionResetError):
            while data := await loop.sock_recv(self.sock, 1 << 16):
                for frame in decoder.feed(data):
                    self.received.append((frame.stream_id, Response.FromString(frame.data)))
        self.closed = True

    def codes(self) -> list[int]:
        return [response.status.code for _, response in self.received]

    def stop(self) -> None:
        self._task.cancel()
