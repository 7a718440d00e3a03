"""PortForward: a busybox httpd in a real container, fetched from the host
through the agent; many connections, big downloads byte for byte, and
nothing left behind when a forward ends early."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import sys
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
        await api.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id=f"fwd-{os.getpid()}"))
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
        await api.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id=f"half-{os.getpid()}"))
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


# --- unix sockets ---------------------------------------------------------------


@pytest.fixture
async def sockets(
    container_agent: AgentProcess, rootfs: Path, tmp_path: Path
) -> AsyncIterator[tuple[Client, str, Path]]:
    """A running container and a fresh directory in it; (client, its path inside,
    the directory here)."""
    name = f"sock-{os.getpid()}-{tmp_path.name}"
    here = rootfs / name
    here.mkdir()
    async with await Client.connect(container_agent.address) as client:
        await start_container(Stub(client, AGENT), rootfs, "app", "/bin/sleep", "1000")
        try:
            yield client, f"/{name}", here
        finally:
            for f in here.iterdir():
                f.unlink()
            here.rmdir()


async def _shouting_server(directory: Path, name: str) -> tuple[asyncio.Server, list[int]]:
    """A unix socket server at directory/name (bound through an fd of the directory:
    socket paths are short) that answers each connection's bytes in upper case once
    it has them all; and a list that counts its connections."""
    seen: list[int] = []

    async def shout(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(1)
        writer.write((await reader.read()).upper())
        await writer.drain()
        writer.close()

    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        server = await asyncio.start_unix_server(shout, f"/proc/self/fd/{fd}/{name}")
    finally:
        os.close(fd)
    return server, seen


async def _through(extensions: Extensions, target: ext.ForwardTarget, data: bytes) -> bytes:
    """What the target answers `data` (sent, then half-closed) through one forward."""
    answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await forward(extensions, reader, writer, target)
        finally:
            writer.close()

    server = await asyncio.start_server(carry, "127.0.0.1", 0)
    async with server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.sockets[0].getsockname()[1]
        )
        writer.write(data)
        writer.write_eof()
        answer.set_result(await reader.read())
        writer.close()
    return await answer


async def test_unix_socket_in_a_container(sockets: Any) -> None:
    client, inside, here = sockets
    server, seen = await _shouting_server(here, "app.sock")
    data = os.urandom(3 << 20).hex().encode()  # 6 MiB: more than a window each way
    target = ext.ForwardTarget(
        unix_socket=ext.FileLocation(container_id="app", path=f"{inside}/app.sock")
    )
    async with server:
        assert await _through(Extensions(client), target, data) == data.upper()
    assert seen == [1]


async def test_unix_socket_paths_never_leave_the_container(sockets: Any, tmp_path: Path) -> None:
    """A symlink in the container to a socket outside it (absolute, or up through '..')
    resolves inside the container: the socket outside is never reached."""
    client, inside, here = sockets
    outside, seen = await _shouting_server(tmp_path, "host.sock")
    (here / "abs.sock").symlink_to(tmp_path / "host.sock")
    (here / "up.sock").symlink_to("../" * 40 + str(tmp_path / "host.sock").lstrip("/"))
    (here / "plain").write_text("not a socket")
    extensions = Extensions(client)
    cases = [
        (f"{inside}/abs.sock", Code.INVALID_ARGUMENT, "No such file"),
        (f"{inside}/up.sock", Code.INVALID_ARGUMENT, "No such file"),
        (f"/../../..{tmp_path}/host.sock", Code.INVALID_ARGUMENT, "No such file"),
        (f"{inside}/plain", Code.INVALID_ARGUMENT, "not a unix socket"),
        ("relative.sock", Code.INVALID_ARGUMENT, "must be absolute"),
        (f"{inside}/nobody.sock", Code.INVALID_ARGUMENT, "No such file"),
    ]
    async with outside:
        for path, code, words in cases:
            target = ext.ForwardTarget(unix_socket=ext.FileLocation(container_id="app", path=path))
            channel = await extensions.open("PortForward", ext.ForwardMessage)
            channel.send(ext.ForwardMessage(open=target))
            assert await channel.recv() is None
            with pytest.raises(TtrpcError) as failed:
                await channel.finish()
            assert failed.value.code == code and words in failed.value.message, (path, failed.value)
        both = ext.ForwardTarget(
            port=80, unix_socket=ext.FileLocation(container_id="app", path=f"{inside}/x")
        )
        channel = await extensions.open("PortForward", ext.ForwardMessage)
        channel.send(ext.ForwardMessage(open=both))
        with pytest.raises(TtrpcError) as failed:
            await channel.finish()
        assert failed.value.code == Code.INVALID_ARGUMENT and "not both" in failed.value.message
        # A socket nobody listens on: refused, as a TCP port would be.
        fd = os.open(here, os.O_PATH | os.O_DIRECTORY)
        with socket.socket(socket.AF_UNIX) as stale:
            stale.bind(f"/proc/self/fd/{fd}/stale.sock")
        os.close(fd)
        target = ext.ForwardTarget(
            unix_socket=ext.FileLocation(container_id="app", path=f"{inside}/stale.sock")
        )
        channel = await extensions.open("PortForward", ext.ForwardMessage)
        channel.send(ext.ForwardMessage(open=target))
        with pytest.raises(TtrpcError) as failed:
            await channel.finish()
        assert failed.value.code == Code.UNAVAILABLE and "refused" in failed.value.message
    assert seen == []


async def test_ctl_port_forward_to_a_unix_socket(
    sockets: Any, container_agent: AgentProcess
) -> None:
    _client, inside, here = sockets
    server, seen = await _shouting_server(here, "ctl.sock")
    async with server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pykata.ctl.cli",
            "port-forward",
            container_agent.address,
            f"0:app:{inside}/ctl.sock",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            line = (await proc.stdout.readline()).decode()
            assert f"-> unix socket {inside}/ctl.sock in container app" in line, line
            port = int(line.split()[1].rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello through kata-agent-ctl")
            writer.write_eof()
            assert await reader.read() == b"HELLO THROUGH KATA-AGENT-CTL"
            writer.close()
        finally:
            proc.send_signal(signal.SIGINT)
            _, err = await proc.communicate()
        assert proc.returncode == 0, err
    assert seen == [1]
