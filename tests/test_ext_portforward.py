"""PortForward: a busybox httpd in a real container, fetched from the host
through the agent; many connections, big downloads byte for byte, and
nothing left behind when a forward ends early."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pykata.api import agent_pb2
from pykata.api import extensions_pb2 as ext
from pykata.extensions.client import Extensions
from pykata.extensions.forward import forward
from pykata.ttrpc import Client, Code, Stub, TtrpcError

from .conftest import AgentProcess
from .extensions import established, eventually, init_pid, open_fds, start_container

AGENT = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
PORT = 8080


@pytest.fixture
async def web(
    container_agent: AgentProcess, rootfs: Path, tmp_path: Path
) -> AsyncIterator[tuple[Client, Path, int]]:
    """A sandbox with busybox httpd serving a directory of the rootfs; (client, www, pid)."""
    www = rootfs / "tmp" / f"www-{os.getpid()}-{tmp_path.name}"
    www.mkdir(parents=True)
    (www / "index.html").write_text("hello from the sandbox\n")
    async with await Client.connect(container_agent.address) as client:
        api = Stub(client, AGENT)
        await api.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id="fwd"))
        inside = "/" + str(www.relative_to(rootfs))
        await start_container(
            api, rootfs, "web", "/usr/sbin/httpd", "-f", "-p", str(PORT), "-h", inside
        )
        pid = init_pid(tmp_path / "run", "web")
        await eventually(lambda: _listening(pid, PORT))
        try:
            yield client, www, pid
        finally:
            for f in www.iterdir():
                f.unlink()
            www.rmdir()


def _listening(pid: int, port: int) -> bool:
    text = Path(f"/proc/{pid}/net/tcp").read_text() + Path(f"/proc/{pid}/net/tcp6").read_text()
    return (
        f":{port:04X} 00000000:0000 0A" in text
        or f":{port:04X} 00000000000000000000000000000000:0000 0A" in text
    )


async def _local_forward(client: Client, port: int = PORT) -> tuple[asyncio.Server, int]:
    """A local listener whose connections are forwarded to `port` in the sandbox."""
    extensions = Extensions(client)

    async def carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await forward(extensions, reader, writer, ext.ForwardTarget(port=port))
        except (TtrpcError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(carry, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def http_get(port: int, path: str) -> bytes:
    """The body of GET `path` (HTTP/1.0: the server closes after it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: sandbox\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], head[:200]
    return body


async def test_http_server_in_a_container_fetched_from_the_host(web: Any) -> None:
    client, _www, _pid = web
    server, port = await _local_forward(client)
    async with server:
        assert await http_get(port, "/index.html") == b"hello from the sandbox\n"


async def test_sixteen_connections_at_once(web: Any) -> None:
    client, www, _pid = web
    for n in range(16):
        (www / f"f{n}").write_bytes(os.urandom(100_000 + n * 7919))
    server, port = await _local_forward(client)
    async with server:
        bodies = await asyncio.gather(*(http_get(port, f"/f{n}") for n in range(16)))
    for n, body in enumerate(bodies):
        assert body == (www / f"f{n}").read_bytes()


async def test_large_download_byte_for_byte(web: Any) -> None:
    client, www, _pid = web
    data = os.urandom(1 << 20) * 96  # 96 MiB: many windows' worth
    (www / "big").write_bytes(data)
    server, port = await _local_forward(client)
    async with server:
        body = await http_get(port, "/big")
    assert len(body) == len(data)
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()


async def test_half_close_reaches_the_target(
    container_agent: AgentProcess, rootfs: Path, tmp_path: Path
) -> None:
    """The client's eof is a shutdown(SHUT_WR) at the target: `nc -l` sees end of
    input, answers, and closes."""
    async with await Client.connect(container_agent.address) as client:
        api = Stub(client, AGENT)
        await api.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id="half"))
        script = "nc -l -p 9000 | wc -c | nc -l -p 9001"
        await start_container(
            api, rootfs, "nc", "/bin/sh", "-c", "while true; do " + script + "; done"
        )
        pid = init_pid(tmp_path / "run", "nc")
        await eventually(lambda: _listening(pid, 9000))
        server, port = await _local_forward(client, 9000)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"x" * 12345)
            writer.write_eof()
            assert await reader.read() == b""  # nc closes after our eof
            writer.close()
            await eventually(lambda: _listening(pid, 9001))
            server2, port2 = await _local_forward(client, 9001)
            async with server2:
                reader, writer = await asyncio.open_connection("127.0.0.1", port2)
                assert (await reader.read()).strip() == b"12345"
                writer.close()


async def test_forward_closed_mid_transfer_leaves_nothing_behind(
    web: Any, container_agent: AgentProcess
) -> None:
    client, www, pid = web
    (www / "big").write_bytes(os.urandom(1 << 20) * 64)
    agent_pid = container_agent.proc.pid
    # One completed forward first, so whatever the agent keeps for good (imports,
    # the thread that makes sockets in the sandbox) is there before counting.
    server, port = await _local_forward(client)
    async with server:
        await http_get(port, "/index.html")
        await eventually(lambda: established(pid, PORT) == 0)
        baseline = open_fds(agent_pid)
        # (1) the local client goes away after a few MiB
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /big HTTP/1.0\r\n\r\n")
            await reader.readexactly(4 << 20)
            writer.transport.abort()
        await eventually(lambda: established(pid, PORT) == 0)
        await eventually(lambda: open_fds(agent_pid) == baseline)
    # (2) the whole connection to the agent is dropped mid-transfer
    async with await Client.connect(container_agent.address) as other:
        server, port = await _local_forward(other)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /big HTTP/1.0\r\n\r\n")
            await reader.readexactly(4 << 20)
            assert other._transport is not None
            other._transport.abort()
            writer.close()
    await eventually(lambda: established(pid, PORT) == 0)
    await eventually(lambda: open_fds(agent_pid) == baseline)
    # and the agent goes on forwarding
    server, port = await _local_forward(client)
    async with server:
        assert await http_get(port, "/index.html") == b"hello from the sandbox\n"


async def test_bad_targets_are_named(web: Any) -> None:
    client, _www, _pid = web
    extensions = Extensions(client)
    cases = [
        (
            ext.ForwardTarget(host="example.com", port=80),
            Code.INVALID_ARGUMENT,
            "not an IP address",
        ),
        (ext.ForwardTarget(port=0), Code.INVALID_ARGUMENT, "port 0"),
        (ext.ForwardTarget(port=70000), Code.INVALID_ARGUMENT, "port 70000"),
        (ext.ForwardTarget(port=9), Code.UNAVAILABLE, "refused"),
    ]
    for target, code, words in cases:
        channel = await extensions.open("PortForward", ext.ForwardMessage)
        channel.send(ext.ForwardMessage(open=target))
        assert await channel.recv() is None
        with pytest.raises(TtrpcError) as failed:
            await channel.finish()
        assert failed.value.code == code and words in failed.value.message, failed.value
    # a first message without open
    channel = await extensions.open("PortForward", ext.ForwardMessage)
    channel.send(ext.ForwardMessage(data=b"hello"))
    with pytest.raises(TtrpcError) as failed:
        await channel.finish()
    assert failed.value.code == Code.INVALID_ARGUMENT and "'open'" in failed.value.message


async def test_forwards_at_once_are_bounded(web: Any) -> None:
    client, _www, _pid = web
    extensions = Extensions(client)
    caps = await extensions.capabilities()
    held = []
    for _ in range(caps.limits.max_forwards):
        channel = await extensions.open("PortForward", ext.ForwardMessage)
        channel.send(ext.ForwardMessage(open=ext.ForwardTarget(port=PORT)))
        first = await channel.recv()
        assert first is not None and first.opened
        held.append(channel)
    channel = await extensions.open("PortForward", ext.ForwardMessage)
    channel.send(ext.ForwardMessage(open=ext.ForwardTarget(port=PORT)))
    with pytest.raises(TtrpcError) as failed:
        await channel.finish()
    assert failed.value.code == Code.RESOURCE_EXHAUSTED and "limit" in failed.value.message
    for channel in held:
        channel.abort()
    server, port = await _local_forward(client)
    async with server:
        for _ in range(100):  # the aborted forwards end as their aborts arrive
            try:
                assert await http_get(port, "/index.html") == b"hello from the sandbox\n"
                break
            except AssertionError:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("no forward after the others ended")
