"""Every row of docs/api.md's status-code table, provoked on a real agent.

The table says, for each RPC and failure case, the code upstream's Rust agent
answers (with the upstream source) and so the code we answer. Each row here
has a provocation: the test reads the table from the docs, makes the case
happen against a kata-agent process running real containers, and compares
the code on the wire. A row without a provocation, or a provocation without
a row, fails too, so the docs and the agent cannot drift apart.
"""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pykata.api import agent_pb2
from pykata.ttrpc import Client, Code, Stub, TtrpcError

from .conftest import AgentProcess, run_container_agent
from .containers import process, spec

AGENT = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
DOCS = Path(__file__).parent.parent / "docs" / "api.md"
ROW = re.compile(r"^\| (?P<rpc>[\w./]+) \| (?P<case>[^|]+?) \| (?P<code>[A-Z_]+) \|")


def documented_rows() -> dict[tuple[str, str], Code]:
    """(RPC, case) -> code, from the table under "## Status codes" in docs/api.md."""
    text = DOCS.read_text()
    section = text.split("## Status codes", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match and match["rpc"] != "RPC":
            rows[(match["rpc"], match["case"].strip())] = Code[match["code"]]
    return rows


@dataclass
class Scene:
    """A client to the agent and the things a provocation needs."""

    api: Any
    client: Client
    rootfs: Path
    tag: str

    def cid(self, name: str) -> str:
        return f"{name}-{self.tag}"

    async def container(self, name: str, *args: str, terminal: bool = False) -> str:
        cid = self.cid(name)
        command = args or ("/bin/sleep", "300")
        await self.api.CreateContainer(
            agent_pb2.CreateContainerRequest(
                container_id=cid, exec_id=cid, OCI=spec(self.rootfs, *command, terminal=terminal)
            )
        )
        await self.api.StartContainer(agent_pb2.StartContainerRequest(container_id=cid))
        return cid

    async def exited_exec(self) -> tuple[str, str]:
        """A running container with an exec that has exited (its status not collected)."""
        cid = await self.container("host")
        await self.api.ExecProcess(
            agent_pb2.ExecProcessRequest(
                container_id=cid, exec_id="quick", process=process("/bin/true")
            )
        )
        # The end of its output: the process has closed its stdout, it has exited.
        request = agent_pb2.ReadStreamRequest(container_id=cid, exec_id="quick", len=100)
        while (await self.api.ReadStdout(request)).data:
            pass
        return cid, "quick"


Provocation = Callable[[Scene], Awaitable[Any]]
PROVOCATIONS: dict[tuple[str, str], Provocation] = {}


def provokes(rpc: str, case: str) -> Callable[[Provocation], Provocation]:
    def register(fn: Provocation) -> Provocation:
        PROVOCATIONS[(rpc, case)] = fn
        return fn

    return register


R = agent_pb2
GHOST = "ghost-container"


def _unknown_container(rpc: str, request: Any) -> None:
    async def provoke(s: Scene) -> Any:
        return await getattr(s.api, rpc)(request)

    provokes(rpc, "unknown container")(provoke)


for _rpc, _request in {
    "StartContainer": R.StartContainerRequest(container_id=GHOST),
    "RemoveContainer": R.RemoveContainerRequest(container_id=GHOST),
    "ExecProcess": R.ExecProcessRequest(
        container_id=GHOST, exec_id="e1", process=process("/bin/true")
    ),
    "WaitProcess": R.WaitProcessRequest(container_id=GHOST),
    "UpdateContainer": R.UpdateContainerRequest(container_id=GHOST),
    "StatsContainer": R.StatsContainerRequest(container_id=GHOST),
    "PauseContainer": R.PauseContainerRequest(container_id=GHOST),
    "ResumeContainer": R.ResumeContainerRequest(container_id=GHOST),
    "WriteStdin": R.WriteStreamRequest(container_id=GHOST, data=b"x"),
    "ReadStdout": R.ReadStreamRequest(container_id=GHOST, len=10),
    "ReadStderr": R.ReadStreamRequest(container_id=GHOST, len=10),
    "CloseStdin": R.CloseStdinRequest(container_id=GHOST),
    "TtyWinResize": R.TtyWinResizeRequest(container_id=GHOST, row=1, column=1),
    "GetDiagnosticData": R.GetDiagnosticDataRequest(log_type="termination_log", container_id=GHOST),
}.items():
    _unknown_container(_rpc, _request)


@provokes("SignalProcess", "unknown container")
async def _(s: Scene) -> Any:
    return await s.api.SignalProcess(
        R.SignalProcessRequest(container_id=GHOST, exec_id="e1", signal=signal.SIGTERM)
    )


@provokes("SignalProcess", "unknown container, kill all (no exec id, SIGKILL)")
async def _(s: Scene) -> Any:
    return await s.api.SignalProcess(
        R.SignalProcessRequest(container_id=GHOST, signal=signal.SIGKILL)
    )


def _unknown_exec(rpc: str, make: Callable[[str], Any]) -> None:
    async def provoke(s: Scene) -> Any:
        cid = await s.container("host")
        return await getattr(s.api, rpc)(make(cid))

    provokes(rpc, "unknown exec")(provoke)


for _rpc, _make in {
    "SignalProcess": lambda c: R.SignalProcessRequest(container_id=c, exec_id="nope", signal=15),
    "WaitProcess": lambda c: R.WaitProcessRequest(container_id=c, exec_id="nope"),
    "ReadStdout": lambda c: R.ReadStreamRequest(container_id=c, exec_id="nope", len=10),
    "ReadStderr": lambda c: R.ReadStreamRequest(container_id=c, exec_id="nope", len=10),
    "CloseStdin": lambda c: R.CloseStdinRequest(container_id=c, exec_id="nope"),
    "TtyWinResize": lambda c: R.TtyWinResizeRequest(container_id=c, exec_id="nope", row=1),
    "WriteStdin": lambda c: R.WriteStreamRequest(container_id=c, exec_id="nope", data=b"x"),
}.items():
    _unknown_exec(_rpc, _make)


@provokes("WaitProcess", "status already collected")
async def _(s: Scene) -> Any:
    cid, exec_id = await s.exited_exec()
    await s.api.WaitProcess(R.WaitProcessRequest(container_id=cid, exec_id=exec_id))
    return await s.api.WaitProcess(R.WaitProcessRequest(container_id=cid, exec_id=exec_id))


@provokes("SignalProcess", "status already collected")
async def _(s: Scene) -> Any:
    cid, exec_id = await s.exited_exec()
    await s.api.WaitProcess(R.WaitProcessRequest(container_id=cid, exec_id=exec_id))
    return await s.api.SignalProcess(
        R.SignalProcessRequest(container_id=cid, exec_id=exec_id, signal=15)
    )


@provokes("SignalProcess", "exited, status not collected")
async def _(s: Scene) -> Any:
    cid, exec_id = await s.exited_exec()
    return await s.api.SignalProcess(
        R.SignalProcessRequest(container_id=cid, exec_id=exec_id, signal=15)
    )


@provokes("SignalProcess", "signal 0")
async def _(s: Scene) -> Any:
    cid = await s.container("host")
    return await s.api.SignalProcess(R.SignalProcessRequest(container_id=cid, signal=0))


@provokes("SignalProcess", "signal number out of range")
async def _(s: Scene) -> Any:
    cid = await s.container("host")
    return await s.api.SignalProcess(R.SignalProcessRequest(container_id=cid, signal=999))


@provokes("CreateContainer", "no OCI spec")
async def _(s: Scene) -> Any:
    return await s.api.CreateContainer(R.CreateContainerRequest(container_id=s.cid("nooci")))


@provokes("CreateContainer", "no process args")
async def _(s: Scene) -> Any:
    return await s.api.CreateContainer(
        R.CreateContainerRequest(container_id=s.cid("noargs"), OCI=spec(s.rootfs))
    )


@provokes("CreateContainer", "id already in use")
async def _(s: Scene) -> Any:
    cid = await s.container("dup")
    return await s.api.CreateContainer(
        R.CreateContainerRequest(container_id=cid, OCI=spec(s.rootfs, "/bin/true"))
    )


@provokes("CreateContainer", "invalid container id")
async def _(s: Scene) -> Any:
    return await s.api.CreateContainer(
        R.CreateContainerRequest(container_id="../escape", OCI=spec(s.rootfs, "/bin/true"))
    )


@provokes("ExecProcess", "no process")
async def _(s: Scene) -> Any:
    cid = await s.container("host")
    return await s.api.ExecProcess(R.ExecProcessRequest(container_id=cid, exec_id="np"))


@provokes("ExecProcess", "invalid exec id")
async def _(s: Scene) -> Any:
    cid = await s.container("host")
    return await s.api.ExecProcess(
        R.ExecProcessRequest(
            container_id=cid, exec_id="../../../tmp/x", process=process("/bin/true")
        )
    )


@provokes("ExecProcess", "exec id already in use")
async def _(s: Scene) -> Any:
    cid = await s.container("host")
    exec_request = R.ExecProcessRequest(
        container_id=cid, exec_id="twice", process=process("/bin/sleep", "300")
    )
    await s.api.ExecProcess(exec_request)
    return await s.api.ExecProcess(exec_request)


@provokes("ExecProcess", "container stopped")
async def _(s: Scene) -> Any:
    cid = await s.container("short", "/bin/true")
    await s.api.WaitProcess(R.WaitProcessRequest(container_id=cid))
    return await s.api.ExecProcess(
        R.ExecProcessRequest(container_id=cid, exec_id="late", process=process("/bin/true"))
    )


@provokes("ExecProcess", "runtime failure")
async def _(s: Scene) -> Any:
    cid = await s.container("host")
    return await s.api.ExecProcess(
        R.ExecProcessRequest(container_id=cid, exec_id="bad", process=process("/no/such/binary"))
    )


@provokes("StartContainer", "already started")
async def _(s: Scene) -> Any:
    cid = await s.container("host")
    return await s.api.StartContainer(R.StartContainerRequest(container_id=cid))


@provokes("PauseContainer", "already paused")
async def _(s: Scene) -> Any:
    cid = await s.container("host")
    await s.api.PauseContainer(R.PauseContainerRequest(container_id=cid))
    try:
        return await s.api.PauseContainer(R.PauseContainerRequest(container_id=cid))
    finally:
        await s.api.ResumeContainer(R.ResumeContainerRequest(container_id=cid))


@provokes("ResumeContainer", "not paused")
async def _(s: Scene) -> Any:
    cid = await s.container("host")
    return await s.api.ResumeContainer(R.ResumeContainerRequest(container_id=cid))


@provokes("UpdateContainer", "no resources")
async def _(s: Scene) -> Any:
    cid = await s.container("host")
    return await s.api.UpdateContainer(R.UpdateContainerRequest(container_id=cid))


@provokes("TtyWinResize", "no terminal")
async def _(s: Scene) -> Any:
    cid = await s.container("host")
    return await s.api.TtyWinResize(R.TtyWinResizeRequest(container_id=cid, row=2, column=2))


@provokes("WriteStdin", "stdin closed")
async def _(s: Scene) -> Any:
    cid = await s.container("cat", "/bin/cat")
    await s.api.CloseStdin(R.CloseStdinRequest(container_id=cid))
    return await s.api.WriteStdin(R.WriteStreamRequest(container_id=cid, data=b"late"))


@provokes("WriteStdin", "process exited")
async def _(s: Scene) -> Any:
    cid, exec_id = await s.exited_exec()
    return await s.api.WriteStdin(
        R.WriteStreamRequest(container_id=cid, exec_id=exec_id, data=b"late")
    )


@provokes("WriteStdin", "empty data (closes stdin)")
async def _(s: Scene) -> Any:
    cid = await s.container("cat", "/bin/sh", "-c", "cat; echo after-eof")
    reply = await s.api.WriteStdin(R.WriteStreamRequest(container_id=cid, data=b""))
    out = await s.api.ReadStdout(R.ReadStreamRequest(container_id=cid, len=100))
    assert (reply.len, out.data) == (0, b"after-eof\n")
    return reply


@provokes("CloseStdin", "twice")
async def _(s: Scene) -> Any:
    cid = await s.container("cat", "/bin/cat")
    await s.api.CloseStdin(R.CloseStdinRequest(container_id=cid))
    return await s.api.CloseStdin(R.CloseStdinRequest(container_id=cid))


@provokes("ReadStdout", "end of stream")
async def _(s: Scene) -> Any:
    cid = await s.container("echo", "/bin/echo", "bye")
    first = await s.api.ReadStdout(R.ReadStreamRequest(container_id=cid, len=32768))
    last = await s.api.ReadStdout(R.ReadStreamRequest(container_id=cid, len=32768))
    assert (first.data, last.data) == (b"bye\n", b"")
    return last


@provokes("ReadStdout", "len 0")
async def _(s: Scene) -> Any:
    cid = await s.container("echo", "/bin/echo", "kept")
    empty = await s.api.ReadStdout(R.ReadStreamRequest(container_id=cid, len=0))
    data = await s.api.ReadStdout(R.ReadStreamRequest(container_id=cid, len=100))
    assert (empty.data, data.data) == (b"", b"kept\n")
    return empty


@provokes("ReadStderr", "terminal process")
async def _(s: Scene) -> Any:
    cid = await s.container("tty", "/bin/sh", "-c", "echo on-the-tty; sleep 300", terminal=True)
    stderr = await s.api.ReadStderr(R.ReadStreamRequest(container_id=cid, len=100))
    stdout = b""
    while not stdout.endswith(b"\n"):  # the output is still all there, on stdout
        stdout += (await s.api.ReadStdout(R.ReadStreamRequest(container_id=cid, len=100))).data
    assert (stderr.data, stdout) == (b"", b"on-the-tty\r\n")
    return stderr


@provokes("UpdateInterface", "no interface")
async def _(s: Scene) -> Any:
    return await s.api.UpdateInterface(R.UpdateInterfaceRequest())


@provokes("UpdateRoutes", "no routes")
async def _(s: Scene) -> Any:
    return await s.api.UpdateRoutes(R.UpdateRoutesRequest())


@provokes("AddARPNeighbors", "no neighbors")
async def _(s: Scene) -> Any:
    return await s.api.AddARPNeighbors(R.AddARPNeighborsRequest())


@provokes("GetDiagnosticData", "unknown log_type")
async def _(s: Scene) -> Any:
    return await s.api.GetDiagnosticData(R.GetDiagnosticDataRequest(log_type="nonsense"))


@provokes("GetOOMEvent", "waiting when the sandbox is destroyed")
async def _(s: Scene) -> Any:
    waiting = asyncio.ensure_future(s.api.GetOOMEvent(R.GetOOMEventRequest()))
    await asyncio.sleep(0)  # its request is written first, on the same connection
    await s.api.DestroySandbox(R.DestroySandboxRequest())
    return await asyncio.wait_for(waiting, 30)  # a bound for "never", not a measurement


@provokes("CopyFile", "path outside the shared directory")
async def _(s: Scene) -> Any:
    return await s.api.CopyFile(
        R.CopyFileRequest(path="/etc/pykata-evil", file_size=1, file_mode=0o100644, data=b"x")
    )


@provokes("CreateSandbox", "unknown storage driver")
async def _(s: Scene) -> Any:
    return await s.api.CreateSandbox(
        R.CreateSandboxRequest(storages=[R.Storage(driver="9p", mount_point="/run/x")])
    )


@provokes("grpc.Unknown/Anything", "unknown service")
async def _(s: Scene) -> Any:
    return await s.client.call_raw("grpc.Unknown", "Anything", b"")


@provokes("grpc.AgentService/NoSuchMethod", "unknown method")
async def _(s: Scene) -> Any:
    return await s.client.call_raw("grpc.AgentService", "NoSuchMethod", b"")


@provokes("StartContainer", "undecodable request")
async def _(s: Scene) -> Any:
    return await s.client.call_raw("grpc.AgentService", "StartContainer", b"\xff\xff\xff")


@pytest.fixture(scope="module")
def shared_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    with run_container_agent(tmp_path_factory.mktemp("codes")) as agent:
        yield agent


@pytest.fixture
async def scene(
    shared_agent: AgentProcess, rootfs: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Scene]:
    tag = f"r{abs(hash(request.node.name)) % 10**8}"
    async with await Client.connect(shared_agent.address) as client:
        yield Scene(Stub(client, AGENT), client, rootfs, tag)


def test_every_row_has_a_provocation_and_back() -> None:
    rows = documented_rows()
    assert len(rows) >= 40, "the table in docs/api.md was not found"
    assert sorted(set(rows) - set(PROVOCATIONS)) == []
    assert sorted(set(PROVOCATIONS) - set(rows)) == []


@pytest.mark.parametrize("row", sorted(PROVOCATIONS), ids=lambda row: f"{row[0]}: {row[1]}")
async def test_row(scene: Scene, row: tuple[str, str]) -> None:
    expected = documented_rows()[row]
    try:
        await PROVOCATIONS[row](scene)
        code = Code.OK
    except TtrpcError as exc:
        code = exc.code
        assert exc.message, "every failure says what was wrong"
    assert code == expected, f"{row}: answered {code.name}, the table says {expected.name}"
