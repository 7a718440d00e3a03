"""Exec: processes in real containers with their I/O on one stream."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pykata.api import agent_pb2
from pykata.api import extensions_pb2 as ext
from pykata.extensions.client import Extensions, Piece
from pykata.extensions.streamexec import ExecSession
from pykata.ttrpc import Client, Code, Stub, TtrpcError

from .conftest import AgentProcess
from .containers import process
from .extensions import eventually, start_container

AGENT = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
CTL = [sys.executable, "-m", "pykata.ctl.cli"]
MiB = 1 << 20


@pytest.fixture
async def box(container_agent: AgentProcess, rootfs: Path) -> AsyncIterator[Extensions]:
    async with await Client.connect(container_agent.address) as client:
        await start_container(Stub(client, AGENT), rootfs, "box", "/bin/sleep", "1000")
        yield Extensions(client)


async def collect(session: ExecSession) -> tuple[bytes, bytes]:
    out, err = bytearray(), bytearray()
    async for stream, data in session.output():
        (out if stream == "stdout" else err).extend(data)
    return bytes(out), bytes(err)


async def test_output_streams_and_exit_status(box: Extensions) -> None:
    session = await ExecSession.start(
        box, "box", process("/bin/sh", "-c", "echo out; echo err >&2; exit 7")
    )
    assert session.exec_id.startswith("exec-")
    assert await collect(session) == (b"out\n", b"err\n")
    assert session.exit_status == 7


async def test_large_output_byte_for_byte(box: Extensions, rootfs: Path) -> None:
    data = os.urandom(MiB) * 40
    name = f"big-{os.getpid()}"
    (rootfs / "tmp" / name).write_bytes(data)
    try:
        session = await ExecSession.start(box, "box", process("/bin/cat", f"/tmp/{name}"))
        out, err = await collect(session)
    finally:
        (rootfs / "tmp" / name).unlink()
    assert err == b"" and session.exit_status == 0
    assert len(out) == len(data) and hashlib.sha256(out).digest() == hashlib.sha256(data).digest()


async def test_stdout_and_stderr_at_once_both_byte_for_byte(box: Extensions, rootfs: Path) -> None:
    # Both streams' output moves from its pipe into the one connection at once.
    out, err = os.urandom(MiB) * 12, os.urandom(MiB) * 9
    names = {f"out-{os.getpid()}": out, f"err-{os.getpid()}": err}
    for name, data in names.items():
        (rootfs / "tmp" / name).write_bytes(data)
    o, e = (f"/tmp/{name}" for name in names)
    try:
        session = await ExecSession.start(
            box, "box", process("/bin/sh", "-c", f"cat {o} & cat {e} >&2; wait")
        )
        got_out, got_err = await collect(session)
    finally:
        for name in names:
            (rootfs / "tmp" / name).unlink()
    assert session.exit_status == 0
    assert hashlib.sha256(got_out).digest() == hashlib.sha256(out).digest()
    assert hashlib.sha256(got_err).digest() == hashlib.sha256(err).digest()


async def test_readstdout_on_a_streamed_exec_shares_the_output_without_loss(
    box: Extensions, rootfs: Path
) -> None:
    # An attacker's (or a confused runtime's) ReadStdout on the same exec takes
    # some of the output; the stream must stay whole and no byte go twice.
    expected = os.urandom(8 * MiB)
    name = f"shared-{os.getpid()}"
    (rootfs / "tmp" / name).write_bytes(expected)
    session = await ExecSession.start(box, "box", process("/bin/cat", f"/tmp/{name}"))
    api = Stub(box.client, AGENT)
    request = agent_pb2.ReadStreamRequest(container_id="box", exec_id=session.exec_id, len=4096)

    async def poll() -> list[bytes]:
        taken = []
        with contextlib.suppress(TtrpcError):  # the process is gone once the stream ends
            while data := (await api.ReadStdout(request)).data:
                taken.append(data)
        return taken

    polling = asyncio.ensure_future(poll())
    try:
        streamed = [bytes(data) async for _stream, data in session.output()]
        polled = await polling
    finally:
        (rootfs / "tmp" / name).unlink()
    assert session.exit_status == 0 and polled and streamed
    assert interleaved(expected, streamed, polled)


async def test_a_process_reading_its_own_stdout_back_ends_only_its_bytes(
    box: Extensions,
) -> None:
    # A hostile process opens its stdout pipe for reading (/proc/self/fd/1) and
    # takes bytes the agent has counted for a frame: the connection the runtime
    # runs everything on must not be lost for it, nor the output corrupted.
    script = (
        "exec 3</proc/self/fd/1; (while :; do cat <&3 >/dev/null; done) & "
        "head -c 64000000 /dev/zero; kill $!"
    )
    for _ in range(2):
        session = await ExecSession.start(box, "box", process("/bin/sh", "-c", script))
        out, err = await collect(session)
        assert session.exit_status == 0 and err == b""
        assert len(out) <= 64000000 and not out.strip(b"\0")
    assert (await box.capabilities()).limits.max_execs > 0


def interleaved(whole: bytes, a: list[bytes], b: list[bytes]) -> bool:
    """Whether `whole` is the pieces of `a` and of `b`, each in its order, merged."""
    pos = i = j = 0
    while i < len(a) or j < len(b):
        if i < len(a) and whole.startswith(a[i], pos):
            pos, i = pos + len(a[i]), i + 1
        elif j < len(b) and whole.startswith(b[j], pos):
            pos, j = pos + len(b[j]), j + 1
        else:
            return False
    return pos == len(whole)


async def test_a_quiet_stderr_leaves_stdout_the_whole_window(box: Extensions) -> None:
    # A client that acknowledges nothing yet gets all the window allows on
    # stdout; a stderr with nothing to say holds none of it.
    window = (await box.capabilities()).limits.window_bytes
    command = f"dd if=/dev/zero bs=1M count={2 * window >> 20} 2>/dev/null; sleep 600"
    session = await ExecSession.start(box, "box", process("/bin/sh", "-c", command))
    received = 0

    async def take_unacknowledged() -> None:
        nonlocal received
        while received < window:
            message = await session.channel.recv()  # (not acknowledged: not output())
            assert isinstance(message, Piece) and message.field == "stdout"
            received += len(message.data)

    try:
        await asyncio.wait_for(take_unacknowledged(), 60)  # (a guard: it never stalls)
        assert received == window
    finally:
        session.signal(signal.SIGKILL)
        session.channel.abort()


async def test_stdin_larger_than_the_window_comes_back(box: Extensions) -> None:
    caps = await box.capabilities()
    data = os.urandom(3 * caps.limits.window_bytes + 12345)
    session = await ExecSession.start(box, "box", process("/bin/cat"))

    async def feed() -> None:
        await session.write(data)
        session.close_stdin()

    feeding = asyncio.ensure_future(feed())
    out, _err = await collect(session)
    await feeding
    assert out == data and session.exit_status == 0


async def test_terminal_resize_and_signals(box: Extensions) -> None:
    tty = process("/bin/sh", "-c", "read line; stty size; tty", terminal=True)
    session = await ExecSession.start(box, "box", tty)
    session.resize(33, 101)
    await session.write(b"go\n")
    out, err = await collect(session)
    assert b"33 101" in out and b"/dev/pts/" in out and err == b""
    assert session.exit_status == 0
    session = await ExecSession.start(box, "box", process("/bin/sleep", "1000"))
    session.signal(signal.SIGTERM)
    await collect(session)
    assert session.exit_status == 128 + signal.SIGTERM


def _sleepers(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if cmdline == b"/bin/sleep\0" + marker.encode() + b"\0":
                found.append(int(pid))
    return found


async def test_a_client_that_goes_away_leaves_nothing_running(
    box: Extensions, container_agent: AgentProcess
) -> None:
    session = await ExecSession.start(box, "box", process("/bin/sleep", "7777"))
    await eventually(lambda: len(_sleepers("7777")) == 1)
    session.channel.abort()  # closed before the exit status
    await eventually(lambda: not _sleepers("7777"))
    async with await Client.connect(container_agent.address) as other:
        session = await ExecSession.start(Extensions(other), "box", process("/bin/sleep", "7778"))
        await eventually(lambda: len(_sleepers("7778")) == 1)
        assert other._transport is not None
        other._transport.abort()  # the whole connection lost
    await eventually(lambda: not _sleepers("7778"))
    # the exec ids are free again, and the agent goes on
    session = await ExecSession.start(box, "box", process("/bin/true"), exec_id=session.exec_id)
    await collect(session)
    assert session.exit_status == 0


#: A client in its own process: it starts an exec pouring output, reads some of it
#: (frames spliced into its socket), then stops reading until it is killed.
_POURING_CLIENT = """
import asyncio, sys
from pykata.extensions.client import Extensions
from pykata.extensions.streamexec import ExecSession
from pykata.ttrpc import Client
from tests.containers import process

async def main():
    client = await Client.connect(sys.argv[1])
    session = await ExecSession.start(
        Extensions(client), "box", process("/bin/sh", "-c", "yes 4242 & yes 4242 >&2"),
        exec_id="pouring")
    received, output = 0, session.output()  # (kept open: not leaving it ends the exec)
    while received < 8 << 20:
        _stream, data = await anext(output)
        received += len(data)
    client._transport.pause_reading()
    print("stopped", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


POURING = b"/bin/sh\x00-c\x00yes 4242"


def _fds(pid: int) -> list[str]:
    return sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))


def _running(marker: bytes) -> bool:
    """Whether a process whose command line starts with `marker` runs."""
    for pid in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if pid.isdigit() and Path(f"/proc/{pid}/cmdline").read_bytes().startswith(marker):
                return True
    return False


async def test_a_client_killed_while_output_pours_in_leaves_nothing_behind(
    box: Extensions, container_agent: AgentProcess
) -> None:
    agent = container_agent.proc.pid
    await box.capabilities()
    before = _fds(agent)
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _POURING_CLIENT,
        container_agent.address,
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    assert client.stdout is not None
    assert await client.stdout.readline() == b"stopped\n"
    assert _running(POURING)
    client.kill()  # mid-frame, most likely: its socket holds spliced output
    await client.wait()
    await eventually(lambda: not _running(POURING))
    await eventually(lambda: _fds(agent) == before)
    # its exec id is free, and the agent serves on
    session = await ExecSession.start(box, "box", process("/bin/true"), exec_id="pouring")
    await collect(session)
    assert session.exit_status == 0


async def test_bad_input_is_invalid_argument(box: Extensions) -> None:
    channel = await box.open("Exec", ext.ExecOutput)
    channel.send(ext.ExecInput(start=ext.ExecStart(container_id="box")))
    with pytest.raises(TtrpcError) as failed:
        await channel.finish()
    assert failed.value.code == Code.INVALID_ARGUMENT and "process" in failed.value.message
    channel = await box.open("Exec", ext.ExecOutput)
    channel.send(ext.ExecInput(stdin=b"no start"))
    with pytest.raises(TtrpcError) as failed:
        await channel.finish()
    assert failed.value.code == Code.INVALID_ARGUMENT and "'start'" in failed.value.message
    session = await ExecSession.start(box, "box", process("/bin/sleep", "1000"))
    session.signal(99)
    with pytest.raises(TtrpcError) as failed:
        await collect(session)
    assert failed.value.code == Code.INVALID_ARGUMENT and "signal 99" in failed.value.message
    with pytest.raises(TtrpcError) as failed:
        await ExecSession.start(box, "nosuch", process("/bin/true"))
    assert failed.value.code == Code.NOT_FOUND
    with pytest.raises(TtrpcError) as failed:
        await ExecSession.start(box, "box", process("/bin/true"), exec_id="../x")
    assert failed.value.code == Code.INVALID_ARGUMENT


async def test_an_ack_of_output_not_sent_yet_is_a_protocol_error(box: Extensions) -> None:
    # The agent holds window room for output before the output comes; a client
    # acknowledging that room (bytes it was never sent) breaks flow control.
    session = await ExecSession.start(box, "box", process("/bin/sleep", "1000"))
    await box.capabilities()  # a round trip: the agent is waiting for output now
    session.channel.send(ext.ExecInput(ack=4096))
    session.signal(signal.SIGKILL)  # (taken after the ack: ends the call if the ack passes)
    with pytest.raises(TtrpcError) as failed:
        await collect(session)
    assert failed.value.code == Code.INVALID_ARGUMENT
    assert "acknowledged 4096 bytes, but only 0 are in flight" in failed.value.message


async def test_execs_at_once_are_bounded(box: Extensions) -> None:
    caps = await box.capabilities()
    sessions = await asyncio.gather(
        *(
            ExecSession.start(box, "box", process("/bin/sleep", "1000"))
            for _ in range(caps.limits.max_execs)
        )
    )
    with pytest.raises(TtrpcError) as failed:
        await ExecSession.start(box, "box", process("/bin/true"))
    assert failed.value.code == Code.RESOURCE_EXHAUSTED and "limit" in failed.value.message
    for session in sessions:
        session.signal(signal.SIGKILL)
    await asyncio.gather(*(collect(s) for s in sessions))
    session = await ExecSession.start(box, "box", process("/bin/true"))
    await collect(session)


async def test_as_many_execs_as_allowed_pour_out_on_one_connection_intact(
    box: Extensions,
) -> None:
    # Every exec's two streams spliced into one socket at once, between the
    # other calls' answers queued for it: no frame cut, no byte lost or swapped.
    caps = await box.capabilities()
    sizes = [(512 << 10) + 1000 * i for i in range(caps.limits.max_execs)]
    sessions = await asyncio.gather(
        *(
            ExecSession.start(
                box, "box", process("/bin/sh", "-c", f"head -c {n} /dev/urandom | tee /dev/stderr")
            )
            for n in sizes
        )
    )
    results = await asyncio.gather(*(collect(session) for session in sessions))
    for size, session, (out, err) in zip(sizes, sessions, results, strict=True):
        assert len(out) == size and err == out and session.exit_status == 0


async def test_ctl_exec_scripted(box: Extensions, container_agent: AgentProcess) -> None:
    proc = await asyncio.create_subprocess_exec(
        *CTL,
        "exec",
        "-i",
        container_agent.address,
        "box",
        "--",
        "/bin/sh",
        "-c",
        "tr a-z A-Z; echo done >&2; exit 5",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(b"hello\n")
    assert (proc.returncode, out, err) == (5, b"HELLO\n", b"done\n")
    proc = await asyncio.create_subprocess_exec(
        *CTL,
        "exec",
        container_agent.address,
        "box",
        "--",
        "/bin/cat",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert (proc.returncode, out) == (0, b""), err  # no -i: empty stdin


def test_ctl_exec_interactive_with_a_terminal(
    box: Extensions, container_agent: AgentProcess
) -> None:
    """Under a real pty (script(1)): the command has a terminal and our keys."""
    command = " ".join([*CTL, "exec", "-it", container_agent.address, "box", "--", "/bin/sh"])
    result = subprocess.run(
        ["script", "-qec", command, "/dev/null"],
        input=b"tty; echo $((6*7)); exit 3\n",
        capture_output=True,
        timeout=60,
    )
    assert b"/dev/pts/" in result.stdout and b"42" in result.stdout, result
    assert result.returncode == 3
