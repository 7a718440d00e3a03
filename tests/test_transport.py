"""Addresses and every transport form.

VSOCK: this machine can bind and listen on AF_VSOCK but has no loopback
peer (environment.md), so vsock is tested for parsing, bind and listen only.
Hybrid vsock traffic goes through a small fake VMM socket written here: the
one part of the path that cannot exist on this machine.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pykata.agent.serving import health_service
from pykata.api.health_pb2 import CheckRequest, HealthCheckResponse
from pykata.transport import (
    AbstractAddress,
    AddressError,
    HybridVsockAddress,
    TransportError,
    UnixAddress,
    VsockAddress,
    parse_address,
)
from pykata.ttrpc import Client, Server

from .peers import FakeVmm


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("vsock://-1:1024", VsockAddress(-1, 1024)),
        ("vsock://3:10240", VsockAddress(3, 10240)),
        ("unix:///run/kata/agent.sock", UnixAddress("/run/kata/agent.sock")),
        ("unix://@kata-agent", AbstractAddress("kata-agent")),
        ("hvsock:///run/vc/vm/1/clh.sock:1024", HybridVsockAddress("/run/vc/vm/1/clh.sock", 1024)),
    ],
)
def test_parse_and_print_every_form(text: str, address: object) -> None:
    assert parse_address(text) == address
    assert str(address) == text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("tcp://127.0.0.1:80", "unsupported scheme 'tcp'"),
        ("/tmp/agent.sock", "no scheme"),
        ("vsock://1024", "expected vsock://CID:PORT"),
        ("vsock://x:1", "expected vsock://CID:PORT"),
        ("vsock://3:port", "port 'port' is not a non-negative integer"),
        ("vsock://3:99999999999", "out of range"),
        ("unix://relative.sock", "must be absolute"),
        ("unix://@", "empty abstract socket name"),
        ("hvsock:///run/clh.sock", "expected hvsock:///PATH:PORT"),
    ],
)
def test_bad_addresses_name_the_address_and_the_accepted_forms(text: str, why: str) -> None:
    with pytest.raises(AddressError) as exc:
        parse_address(text)
    message = str(exc.value)
    assert repr(text) in message and why in message
    assert "unix:///PATH" in message and "vsock://CID:PORT" in message
    assert "\n" not in message


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    server = Server([health_service()])
    yield server
    await server.shutdown(grace=0)


async def check(address: str) -> int:
    async with await Client.connect(address, timeout=5) as client:
        reply = await client.call("grpc.Health", "Check", CheckRequest(), HealthCheckResponse)
        return reply.status


async def test_unix_socket_traffic_and_cleanup(server: Server, tmp_path: Path) -> None:
    await server.start(f"unix://{tmp_path}/a.sock")
    assert await check(f"unix://{tmp_path}/a.sock") == HealthCheckResponse.SERVING
    await server.shutdown(grace=0)
    assert not (tmp_path / "a.sock").exists()


async def test_abstract_socket_traffic(server: Server) -> None:
    name = f"pykata-test-{os.getpid()}"
    await server.start(f"unix://@{name}")
    assert await check(f"unix://@{name}") == HealthCheckResponse.SERVING


async def test_stale_socket_is_replaced_but_a_live_one_is_not(
    server: Server, tmp_path: Path
) -> None:
    path = tmp_path / "a.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a crashed agent's leftover
    await server.start(f"unix://{path}")
    assert await check(f"unix://{path}") == HealthCheckResponse.SERVING
    other = Server([health_service()])
    with pytest.raises(TransportError, match="another process is listening"):
        await other.start(f"unix://{path}")


async def test_refuses_to_replace_a_regular_file(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "important.txt"
    path.write_text("keep me")
    with pytest.raises(TransportError, match="exists and is not a socket"):
        await server.start(f"unix://{path}")
    assert path.read_text() == "keep me"


async def test_connect_to_nothing_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(TransportError) as exc:
        await Client.connect(f"unix://{tmp_path}/none.sock", timeout=2)
    assert (
        str(exc.value)
        == f"cannot connect to unix://{tmp_path}/none.sock: No such file or directory"
    )


async def test_hybrid_vsock_connect_through_a_vmm(server: Server, tmp_path: Path) -> None:
    await server.start(f"unix://{tmp_path}/guest.sock")
    async with FakeVmm(tmp_path / "vmm.sock", {1024: str(tmp_path / "guest.sock")}) as vmm:
        assert await check(f"hvsock://{tmp_path}/vmm.sock:1024") == HealthCheckResponse.SERVING
    assert vmm.connects == ["CONNECT 1024\n"]


@pytest.mark.parametrize("reply", ["", "NOPE\n", "OK\n"])
async def test_hybrid_vsock_refused_handshake_is_a_clear_error(tmp_path: Path, reply: str) -> None:
    async with FakeVmm(tmp_path / "vmm.sock", {}, reply=reply):
        with pytest.raises(TransportError) as exc:
            await Client.connect(f"hvsock://{tmp_path}/vmm.sock:1024", timeout=5)
    assert "hybrid vsock handshake" in str(exc.value) and "port 1024" in str(exc.value)


async def test_hybrid_vsock_listen_binds_path_underscore_port(
    server: Server, tmp_path: Path
) -> None:
    await server.start(f"hvsock://{tmp_path}/clh.sock:10240")
    assert (tmp_path / "clh.sock_10240").is_socket()
    # The VMM connects to that socket and speaks the stream directly.
    assert await check(f"unix://{tmp_path}/clh.sock_10240") == HealthCheckResponse.SERVING


async def test_vsock_bind_and_listen(server: Server) -> None:
    """Bind and listen only: there is no vsock peer on this machine to connect from."""
    if not hasattr(socket, "AF_VSOCK"):
        pytest.skip("no AF_VSOCK in this Python")
    try:
        probe = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as exc:
        pytest.skip(f"AF_VSOCK unavailable here: {exc}")
    probe.close()
    port = 40000 + os.getpid() % 20000
    listener = await server.start(f"vsock://-1:{port}")
    sock = listener._server.sockets[0]
    assert sock.family == socket.AF_VSOCK
    assert sock.getsockname() == (socket.VMADDR_CID_ANY, port)
    other = Server([health_service()])
    with pytest.raises(TransportError, match=f"cannot listen on vsock://-1:{port}"):
        await other.start(f"vsock://-1:{port}")


# A raw client run as user nobody by Debian's own python3 (our venv's interpreter
# lives under /root, out of nobody's reach). Prints what the server did.
NOBODY_CLIENT = r"""
import socket, sys
target = sys.argv[1]
target = "\0" + target[1:] if target.startswith("@") else target
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
try:
    s.connect(target)
    s.sendall(bytes.fromhex(sys.argv[2]))
    print("answered" if s.recv(1024) else "closed")
except PermissionError:
    print("denied")
except (ConnectionResetError, BrokenPipeError):
    print("closed")
"""


def as_nobody(target: str) -> str:
    from pykata.ttrpc.protocol import ClientConnection

    _sid, frame = ClientConnection().request("grpc.Health", "Check", b"")
    result = subprocess.run(
        ["/usr/bin/python3", "-c", NOBODY_CLIENT, target, frame.hex()],
        user="nobody",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory anyone may enter, so only the socket's own mode decides."""
    path = Path(tempfile.mkdtemp(prefix="pykata-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as nobody")
async def test_other_users_cannot_use_the_unix_socket(server: Server, open_dir: Path) -> None:
    await server.start(f"unix://{open_dir}/a.sock")
    assert await asyncio.to_thread(as_nobody, f"{open_dir}/a.sock") == "denied"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as nobody")
async def test_other_users_are_turned_away_from_the_abstract_socket(server: Server) -> None:
    name = f"pykata-peercred-{os.getpid()}"
    await server.start(f"unix://@{name}")
    assert await asyncio.to_thread(as_nobody, f"@{name}") == "closed"
    assert await check(f"unix://@{name}") == HealthCheckResponse.SERVING  # root still served


async def test_close_leaves_a_socket_another_process_put_in_its_place(
    server: Server, tmp_path: Path
) -> None:
    listener = await server.start(f"unix://{tmp_path}/a.sock")
    os.unlink(tmp_path / "a.sock")
    newcomer = socket.socket(socket.AF_UNIX)
    newcomer.bind(str(tmp_path / "a.sock"))
    listener.close()
    assert (tmp_path / "a.sock").is_socket()
    newcomer.close()
