"""Real containers under crun and runc, driven through a real kata-agent process."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from pykata.agent import cgroups
from pykata.api import agent_pb2
from pykata.ttrpc import Client, Code, Stub, TtrpcError

from .conftest import AgentProcess, run_container_agent
from .containers import process, spec

AGENT = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]


@pytest.fixture(params=["crun", "runc"])
def runtime(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def agent_proc(tmp_path: Path, runtime: str) -> Iterator[AgentProcess]:
    with run_container_agent(tmp_path, runtime) as agent:
        yield agent


@pytest.fixture
async def api(agent_proc: AgentProcess) -> AsyncIterator[Any]:
    async with await Client.connect(agent_proc.address) as client:
        yield Stub(client, AGENT)


async def read_all(api: Any, cid: str, exec_id: str = "", stream: str = "stdout") -> bytes:
    method = api.ReadStdout if stream == "stdout" else api.ReadStderr
    chunks = []
    while True:
        try:
            reply = await method(
                agent_pb2.ReadStreamRequest(container_id=cid, exec_id=exec_id, len=65536)
            )
        except TtrpcError as exc:
            assert exc.code == Code.OUT_OF_RANGE, exc
            return b"".join(chunks)
        chunks.append(reply.data)


async def test_lifecycle_output_and_exit_code(api: Any, rootfs: Path, tmp_path: Path) -> None:
    await api.CreateContainer(
        agent_pb2.CreateContainerRequest(
            container_id="c1",
            exec_id="c1",
            OCI=spec(rootfs, "/bin/sh", "-c", "echo out; echo err >&2; exit 7"),
        )
    )
    assert (tmp_path / "run" / "containers" / "c1" / "config.json").exists()
    await api.StartContainer(agent_pb2.StartContainerRequest(container_id="c1"))
    out, err, status = await asyncio.gather(
        read_all(api, "c1"),
        read_all(api, "c1", stream="stderr"),
        api.WaitProcess(agent_pb2.WaitProcessRequest(container_id="c1")),
    )
    assert (out, err, status.status) == (b"out\n", b"err\n", 7)
    await api.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id="c1"))
    assert not (tmp_path / "run" / "containers" / "c1").exists()
    with pytest.raises(TtrpcError) as exc:
        await api.StartContainer(agent_pb2.StartContainerRequest(container_id="c1"))
    assert exc.value.code == Code.NOT_FOUND and "c1" in exc.value.message


async def create_started(api: Any, rootfs: Path, cid: str, *args: str, **kw: Any) -> None:
    await api.CreateContainer(
        agent_pb2.CreateContainerRequest(
            container_id=cid, exec_id=cid, OCI=spec(rootfs, *args, **kw)
        )
    )
    await api.StartContainer(agent_pb2.StartContainerRequest(container_id=cid))


async def test_stdin_is_echoed_through_cat(api: Any, rootfs: Path) -> None:
    await create_started(api, rootfs, "cat", "/bin/cat")
    written = await api.WriteStdin(
        agent_pb2.WriteStreamRequest(container_id="cat", data=b"hello through cat\n")
    )
    assert written.len == 18
    await api.CloseStdin(agent_pb2.CloseStdinRequest(container_id="cat"))
    assert await read_all(api, "cat") == b"hello through cat\n"
    status = await api.WaitProcess(agent_pb2.WaitProcessRequest(container_id="cat"))
    assert status.status == 0


async def test_terminal_mode(api: Any, rootfs: Path) -> None:
    await create_started(
        api,
        rootfs,
        "tty",
        "/bin/sh",
        "-c",
        "stty size; [ -t 0 ] && echo is-a-tty; read line; echo got:$line",
        terminal=True,
        consoleSize={"height": 30, "width": 100},
    )
    first = await api.ReadStdout(agent_pb2.ReadStreamRequest(container_id="tty", len=1024))
    output = first.data
    while b"is-a-tty" not in output:
        output += (
            await api.ReadStdout(agent_pb2.ReadStreamRequest(container_id="tty", len=1024))
        ).data
    assert b"30 100" in output
    await api.TtyWinResize(agent_pb2.TtyWinResizeRequest(container_id="tty", row=40, column=120))
    await api.WriteStdin(agent_pb2.WriteStreamRequest(container_id="tty", data=b"typed\n"))
    output += await read_all(api, "tty")
    assert b"got:typed" in output
    with pytest.raises(TtrpcError) as exc:
        await api.ReadStderr(agent_pb2.ReadStreamRequest(container_id="tty", len=10))
    assert exc.value.code == Code.FAILED_PRECONDITION
    assert (await api.WaitProcess(agent_pb2.WaitProcessRequest(container_id="tty"))).status == 0


async def test_exec_exit_codes_and_output(api: Any, rootfs: Path) -> None:
    await create_started(api, rootfs, "ex", "/bin/sleep", "300")
    await api.ExecProcess(
        agent_pb2.ExecProcessRequest(
            container_id="ex",
            exec_id="e1",
            process=process("/bin/sh", "-c", "echo from-exec; exit 42"),
        )
    )
    status = await api.WaitProcess(agent_pb2.WaitProcessRequest(container_id="ex", exec_id="e1"))
    # Waited first, read afterwards: the output is still there.
    out, err = await read_all(api, "ex", "e1"), await read_all(api, "ex", "e1", "stderr")
    assert (out, err, status.status) == (b"from-exec\n", b"", 42)
    with pytest.raises(TtrpcError) as exc:  # waited and read to the end: forgotten
        await api.WaitProcess(agent_pb2.WaitProcessRequest(container_id="ex", exec_id="e1"))
    assert exc.value.code == Code.NOT_FOUND and "e1" in exc.value.message


async def test_exec_with_a_terminal(api: Any, rootfs: Path) -> None:
    await create_started(api, rootfs, "et", "/bin/sleep", "300")
    await api.ExecProcess(
        agent_pb2.ExecProcessRequest(
            container_id="et", exec_id="t", process=process("/bin/sh", "-c", "tty", terminal=True)
        )
    )
    out = await read_all(api, "et", "t")
    assert out.startswith(b"/dev/pts/")
    status = await api.WaitProcess(agent_pb2.WaitProcessRequest(container_id="et", exec_id="t"))
    assert status.status == 0


async def test_signals_to_init_and_exec(api: Any, rootfs: Path) -> None:
    await create_started(
        api,
        rootfs,
        "sig",
        "/bin/sh",
        "-c",
        "trap 'echo got-usr1' USR1; while true; do sleep 0.1; done",
    )
    await api.ExecProcess(
        agent_pb2.ExecProcessRequest(
            container_id="sig", exec_id="sl", process=process("/bin/sleep", "300")
        )
    )
    await api.SignalProcess(
        agent_pb2.SignalProcessRequest(container_id="sig", exec_id="sl", signal=signal.SIGTERM)
    )
    status = await api.WaitProcess(agent_pb2.WaitProcessRequest(container_id="sig", exec_id="sl"))
    assert status.status == 128 + signal.SIGTERM
    await asyncio.sleep(0.2)  # let the trap be installed
    await api.SignalProcess(
        agent_pb2.SignalProcessRequest(container_id="sig", signal=signal.SIGUSR1)
    )
    got = b""
    while b"got-usr1" not in got:
        got += (await api.ReadStdout(agent_pb2.ReadStreamRequest(container_id="sig", len=100))).data
    await api.SignalProcess(
        agent_pb2.SignalProcessRequest(container_id="sig", signal=signal.SIGKILL)
    )
    status = await api.WaitProcess(agent_pb2.WaitProcessRequest(container_id="sig"))
    assert status.status == 128 + signal.SIGKILL


async def test_pause_resume_seen_in_the_freezer(
    api: Any, rootfs: Path, agent_proc: AgentProcess
) -> None:
    await create_started(api, rootfs, "pz", "/bin/sleep", "300")
    cgroup = f"/pykata/agent-{agent_proc.proc.pid}/pz"
    await api.PauseContainer(agent_pb2.PauseContainerRequest(container_id="pz"))
    assert cgroups.freezer_state(cgroup) == "FROZEN"
    with pytest.raises(TtrpcError) as exc:
        await api.PauseContainer(agent_pb2.PauseContainerRequest(container_id="pz"))
    assert exc.value.code == Code.FAILED_PRECONDITION and "paused" in exc.value.message
    await api.ResumeContainer(agent_pb2.ResumeContainerRequest(container_id="pz"))
    assert cgroups.freezer_state(cgroup) == "THAWED"


async def test_memory_limit_update_and_stats(
    api: Any, rootfs: Path, agent_proc: AgentProcess
) -> None:
    await create_started(api, rootfs, "st", "/bin/sh", "-c", "while true; do :; done")
    cgroup = f"/pykata/agent-{agent_proc.proc.pid}/st"
    resources = agent_pb2.UpdateContainerRequest(container_id="st")
    resources.resources.Memory.Limit = 64 << 20
    await api.UpdateContainer(resources)
    assert cgroups.memory_limit(cgroup) == 64 << 20
    first = await api.StatsContainer(agent_pb2.StatsContainerRequest(container_id="st"))
    await asyncio.sleep(0.3)
    second = await api.StatsContainer(agent_pb2.StatsContainerRequest(container_id="st"))
    assert (
        second.cgroup_stats.cpu_stats.cpu_usage.total_usage
        > first.cgroup_stats.cpu_stats.cpu_usage.total_usage
    )
    assert second.cgroup_stats.memory_stats.usage.limit == 64 << 20
    assert second.cgroup_stats.pids_stats.current >= 1
