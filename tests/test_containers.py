"""Real containers under crun and runc, driven through a real kata-agent process."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from pykata.agent import cgroups
from pykata.api import agent_pb2
from pykata.ttrpc import Client, Code, Stub, TtrpcError

from .conftest import AgentProcess, run_container_agent
from .containers import leftovers, process, spec
from .peers import go_client

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
        reply = await method(
            agent_pb2.ReadStreamRequest(container_id=cid, exec_id=exec_id, len=65536)
        )
        if not reply.data:  # the end of the stream
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
    assert exc.value.code == Code.INTERNAL and "c1" in exc.value.message  # as upstream


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
    # A terminal's output is all on stdout: its stderr is empty at once.
    assert (
        await api.ReadStderr(agent_pb2.ReadStreamRequest(container_id="tty", len=10))
    ).data == b""
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
            container_id="et", exec_id="tt", process=process("/bin/sh", "-c", "tty", terminal=True)
        )
    )
    out = await read_all(api, "et", "tt")
    assert out.startswith(b"/dev/pts/")
    status = await api.WaitProcess(agent_pb2.WaitProcessRequest(container_id="et", exec_id="tt"))
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
    assert exc.value.code == Code.INTERNAL and "paused" in exc.value.message  # as upstream
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


async def expect(code: Code, call: Any, *words: str) -> None:
    with pytest.raises(TtrpcError) as exc:
        await call
    assert exc.value.code == code, exc.value
    for word in words:
        assert word in exc.value.message, exc.value.message


async def test_errors_name_the_problem(api: Any, rootfs: Path) -> None:
    create = agent_pb2.CreateContainerRequest
    await expect(
        Code.INVALID_ARGUMENT,
        api.CreateContainer(create(container_id="../escape", OCI=spec(rootfs, "/bin/true"))),
        "container_id",
        "../escape",
    )
    # Upstream's codes (docs/api.md); the messages are ours.
    await expect(
        Code.INTERNAL,
        api.CreateContainer(create(container_id="noargs", OCI=spec(rootfs))),
        "OCI.Process.Args",
    )
    relative = spec(rootfs, "/bin/true")
    relative.Root.Path = "rootfs"
    await expect(
        Code.INTERNAL,
        api.CreateContainer(create(container_id="rel", OCI=relative)),
        "OCI.Root.Path",
        "'rootfs'",
    )
    await expect(Code.INTERNAL, api.CreateContainer(create(container_id="nooci")), "OCI is missing")
    await create_started(api, rootfs, "dup", "/bin/sleep", "300")
    await expect(
        Code.INTERNAL,
        api.CreateContainer(create(container_id="dup", OCI=spec(rootfs, "/bin/true"))),
        "dup",
    )
    await expect(
        Code.INTERNAL,
        api.StartContainer(agent_pb2.StartContainerRequest(container_id="dup")),
        "dup",
        "running",
    )
    await expect(
        Code.NOT_FOUND,
        api.WaitProcess(agent_pb2.WaitProcessRequest(container_id="dup", exec_id="nope")),
        "nope",
    )
    await expect(
        Code.INVALID_ARGUMENT,
        api.PauseContainer(agent_pb2.PauseContainerRequest(container_id="ghost")),
        "ghost",
    )
    await expect(
        Code.INTERNAL,
        api.SignalProcess(agent_pb2.SignalProcessRequest(container_id="dup", signal=999)),
        "999",
    )
    # the runtime's own words for what it could not do
    await expect(
        Code.INTERNAL,
        api.ExecProcess(
            agent_pb2.ExecProcessRequest(
                container_id="dup", exec_id="bad", process=process("/no/such/binary")
            )
        ),
        "/no/such/binary",
    )
    await api.SignalProcess(agent_pb2.SignalProcessRequest(container_id="dup", signal=9))
    await api.WaitProcess(agent_pb2.WaitProcessRequest(container_id="dup"))
    await expect(
        Code.INTERNAL,
        api.ExecProcess(
            agent_pb2.ExecProcessRequest(
                container_id="dup", exec_id="late", process=process("/bin/true")
            )
        ),
        "stopped",
    )
    await expect(
        Code.INTERNAL,
        api.CreateContainer(
            create(
                container_id="st",
                OCI=spec(rootfs, "/bin/true"),
                storages=[agent_pb2.Storage(driver="nvdimm", mount_point="/x")],
            )
        ),
        "nvdimm",
    )
    # and the agent still serves
    await create_started(api, rootfs, "after", "/bin/true")
    assert (await api.WaitProcess(agent_pb2.WaitProcessRequest(container_id="after"))).status == 0


async def test_sandbox_hostname_and_dns_stay_inside(
    api: Any, rootfs: Path, agent_proc: AgentProcess, tmp_path: Path, runtime: str
) -> None:
    host_name = os.uname().nodename
    # A sandbox id names its cgroup parent: one per runtime, as the two run side by side.
    sb1, sb2 = f"sb1-{runtime}", f"sb2-{runtime}"
    await api.CreateSandbox(
        agent_pb2.CreateSandboxRequest(
            sandbox_id=sb1, hostname="sandbox-host", dns=["nameserver 192.0.2.53"]
        )
    )
    await create_started(api, rootfs, "h1", "/bin/sh", "-c", "hostname; cat /etc/resolv.conf")
    assert await read_all(api, "h1") == b"sandbox-host\nnameserver 192.0.2.53\n"
    assert os.uname().nodename == host_name
    await expect(
        Code.INTERNAL,
        api.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id=sb2)),
        sb1,
    )
    await create_started(api, rootfs, "h2", "/bin/sleep", "300")
    await api.DestroySandbox(agent_pb2.DestroySandboxRequest())
    assert leftovers(sb1, tmp_path / "run") == []
    await expect(
        Code.INVALID_ARGUMENT, api.WaitProcess(agent_pb2.WaitProcessRequest(container_id="h1"))
    )
    await expect(
        Code.INTERNAL,
        api.CreateSandbox(
            agent_pb2.CreateSandboxRequest(kernel_modules=[agent_pb2.KernelModule(name="dummy")])
        ),
        "dummy",
        "change the host",
    )
    await api.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id=sb2))


async def test_sigterm_kills_and_removes_every_container(
    tmp_path: Path, rootfs: Path, runtime: str
) -> None:
    with run_container_agent(tmp_path, runtime) as agent:
        async with await Client.connect(agent.address) as client:
            api = Stub(client, AGENT)
            await api.CreateSandbox(agent_pb2.CreateSandboxRequest(hostname="x"))
            for n in range(3):
                await create_started(api, rootfs, f"c{n}", "/bin/sleep", "300")
            await api.ExecProcess(
                agent_pb2.ExecProcessRequest(
                    container_id="c0", exec_id="e0", process=process("/bin/sleep", "300")
                )
            )
            await api.CreateContainer(
                agent_pb2.CreateContainerRequest(
                    container_id="created-only", OCI=spec(rootfs, "/bin/true")
                )
            )
            waiting = asyncio.ensure_future(
                api.WaitProcess(agent_pb2.WaitProcessRequest(container_id="c1"))
            )
            assert leftovers(f"agent-{agent.proc.pid}", tmp_path / "run")
            await asyncio.sleep(0.2)  # the WaitProcess request is on its way
            assert await asyncio.to_thread(agent.stop) == 0
            assert (await waiting).status == 128 + signal.SIGKILL  # answered before exit
        assert leftovers(f"agent-{agent.proc.pid}", tmp_path / "run") == []


def go_call(socket_path: str, method: str, request: Any) -> dict[str, Any]:
    """One AgentService call made by containerd's Go ttRPC client, JSON both ways."""
    [reply] = go_client(
        socket_path, "call", "-method", method, "-request", json_format.MessageToJson(request)
    )
    return reply


def test_go_client_drives_a_container_end_to_end(
    go_peer: Path, agent_proc: AgentProcess, rootfs: Path
) -> None:
    sock = agent_proc.socket_path
    assert sock

    def ok(method: str, request: Any) -> dict[str, Any]:
        reply = go_call(sock, method, request)
        assert reply["status"]["code"] == 0, reply
        return dict(reply["response"])

    ok("CreateSandbox", agent_pb2.CreateSandboxRequest(sandbox_id="go", hostname="go-sandbox"))
    ok(
        "CreateContainer",
        agent_pb2.CreateContainerRequest(
            container_id="g1",
            exec_id="g1",
            OCI=spec(rootfs, "/bin/sh", "-c", "hostname; read x; echo got $x; exit 3"),
        ),
    )
    ok("StartContainer", agent_pb2.StartContainerRequest(container_id="g1"))
    written = ok("WriteStdin", agent_pb2.WriteStreamRequest(container_id="g1", data=b"go\n"))
    assert written["len"] == 3
    output = b""
    while True:
        reply = go_call(
            sock, "ReadStdout", agent_pb2.ReadStreamRequest(container_id="g1", len=4096)
        )
        assert reply["status"]["code"] == Code.OK, reply
        if not reply["response"].get("data"):
            break  # the end of the stream
        output += base64.b64decode(reply["response"]["data"])
    assert output == b"go-sandbox\ngot go\n"
    assert ok("WaitProcess", agent_pb2.WaitProcessRequest(container_id="g1"))["status"] == 3
    ok("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="g1"))
    ok("DestroySandbox", agent_pb2.DestroySandboxRequest())
    missing = go_call(sock, "StartContainer", agent_pb2.StartContainerRequest(container_id="g1"))
    assert missing["status"] == {"code": Code.INTERNAL, "message": "no container 'g1'"}


@pytest.mark.load
async def test_20_containers_and_200_execs_in_parallel(api: Any, rootfs: Path) -> None:
    async def container(n: int) -> tuple[bytes, int]:
        cid = f"par{n}"
        await create_started(
            api,
            rootfs,
            cid,
            "/bin/sh",
            "-c",
            f"for i in $(seq 1 200); do echo c{n}-$i; done; sleep 300",
        )
        return cid.encode(), n

    await asyncio.gather(*(container(n) for n in range(20)))

    async def one_exec(n: int) -> tuple[int, bytes, int]:
        cid, eid = f"par{n % 20}", f"e{n}"
        await api.ExecProcess(
            agent_pb2.ExecProcessRequest(
                container_id=cid,
                exec_id=eid,
                process=process("/bin/sh", "-c", f"seq 1 {n}; exit {n % 256}"),
            )
        )
        out, status = await asyncio.gather(
            read_all(api, cid, eid),
            api.WaitProcess(agent_pb2.WaitProcessRequest(container_id=cid, exec_id=eid)),
        )
        return n, out, status.status

    results = await asyncio.gather(*(one_exec(n) for n in range(200)))
    for n, out, status in results:
        assert status == n % 256
        assert out == "".join(f"{i}\n" for i in range(1, n + 1)).encode()
    # every container's own output, all of it, while they still run
    for n in range(20):
        expected = "".join(f"c{n}-{i}\n" for i in range(1, 201)).encode()
        got = b""
        while len(got) < len(expected):
            got += (
                await api.ReadStdout(agent_pb2.ReadStreamRequest(container_id=f"par{n}", len=65536))
            ).data
        assert got == expected
    await asyncio.gather(
        *(
            api.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id=f"par{n}"))
            for n in range(20)
        )
    )


async def test_client_gone_mid_read_leaks_nothing(
    api: Any, rootfs: Path, agent_proc: AgentProcess
) -> None:
    await create_started(api, rootfs, "quiet", "/bin/cat")
    fds = len(os.listdir(f"/proc/{agent_proc.proc.pid}/fd"))
    for _ in range(5):
        client = await Client.connect(agent_proc.address)
        pending = asyncio.ensure_future(
            Stub(client, AGENT).ReadStdout(
                agent_pb2.ReadStreamRequest(container_id="quiet", len=100)
            )
        )
        await asyncio.sleep(0.1)  # the read is waiting inside the agent
        await client.close()
        with pytest.raises(TtrpcError):
            await pending
    await asyncio.sleep(0.2)
    assert len(os.listdir(f"/proc/{agent_proc.proc.pid}/fd")) == fds
    # the stream is not stuck: a new reader gets what cat echoes
    await api.WriteStdin(agent_pb2.WriteStreamRequest(container_id="quiet", data=b"still here\n"))
    reply = await api.ReadStdout(agent_pb2.ReadStreamRequest(container_id="quiet", len=100))
    assert reply.data == b"still here\n"


def agent_mounts(pid: int) -> str:
    return Path(f"/proc/{pid}/mountinfo").read_text()


async def test_storages_tmpfs_bind_local_and_overlay_rootfs(
    api: Any, rootfs: Path, agent_proc: AgentProcess, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shared = tmp_path / "host-share"
    shared.mkdir()
    (shared / "hello.txt").write_text("from the host\n")
    await api.CreateSandbox(
        agent_pb2.CreateSandboxRequest(
            storages=[
                agent_pb2.Storage(
                    driver="ephemeral",
                    source="tmpfs",
                    fstype="tmpfs",
                    options=["size=1m"],
                    mount_point=f"{run}/sandbox/ephemeral/scratch",
                ),
            ]
        )
    )
    overlay_root = f"{run}/shared/containers/ov/rootfs"
    config = spec(
        rootfs,
        "/bin/sh",
        "-c",
        "cat /share/hello.txt; echo new > /newfile; echo t > /scratch/t; ls -ld /local",
    )
    config.Root.Path = overlay_root
    config.Mounts.add(
        destination="/scratch",
        source=f"{run}/sandbox/ephemeral/scratch",
        type="bind",
        options=["rbind"],
    )
    config.Mounts.add(
        destination="/share", source=f"{run}/shared/bind", type="bind", options=["rbind"]
    )
    config.Mounts.add(
        destination="/local", source=f"{run}/shared/local", type="bind", options=["rbind"]
    )
    await api.CreateContainer(
        agent_pb2.CreateContainerRequest(
            container_id="ov",
            OCI=config,
            storages=[
                agent_pb2.Storage(
                    driver="overlayfs",
                    source="overlay",
                    fstype="overlay",
                    mount_point=overlay_root,
                    options=[
                        f"lowerdir={rootfs}",
                        f"upperdir={run}/shared/ov-upper",
                        f"workdir={run}/shared/ov-work",
                    ],
                ),
                agent_pb2.Storage(
                    driver="bind",
                    source=str(shared),
                    mount_point=f"{run}/shared/bind",
                    options=["ro"],
                ),
                agent_pb2.Storage(
                    driver="local", mount_point=f"{run}/shared/local", options=["mode=0750"]
                ),
            ],
        )
    )
    await api.StartContainer(agent_pb2.StartContainerRequest(container_id="ov"))
    out = await read_all(api, "ov")
    assert out.startswith(b"from the host\n")
    assert b"drwxr-x---" in out  # the local storage's mode
    assert (await api.WaitProcess(agent_pb2.WaitProcessRequest(container_id="ov"))).status == 0
    assert (run / "shared" / "ov-upper" / "newfile").read_text() == "new\n"
    assert not (rootfs / "newfile").exists()  # the lower layer is untouched
    mounts = agent_mounts(agent_proc.proc.pid)
    assert overlay_root in mounts and f"{run}/sandbox/ephemeral/scratch" in mounts
    # the agent's mounts live in its own mount namespace, not the host's
    assert str(run) not in Path("/proc/self/mountinfo").read_text()
    await api.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id="ov"))
    mounts = agent_mounts(agent_proc.proc.pid)
    assert overlay_root not in mounts and f"{run}/shared/bind" not in mounts
    assert f"{run}/sandbox/ephemeral/scratch" in mounts  # the sandbox's, until it goes
    await api.DestroySandbox(agent_pb2.DestroySandboxRequest())
    assert str(run) not in agent_mounts(agent_proc.proc.pid)


async def test_storage_mount_points_cannot_escape(api: Any, rootfs: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "sneaky").symlink_to("/etc")

    def tmpfs_at(point: str) -> Any:
        return api.CreateSandbox(
            agent_pb2.CreateSandboxRequest(
                storages=[agent_pb2.Storage(driver="ephemeral", source="tmpfs", mount_point=point)]
            )
        )

    # Storage failures are INTERNAL, as upstream answers them.
    await expect(Code.INTERNAL, tmpfs_at("/etc"), "outside the agent's directory")
    await expect(Code.INTERNAL, tmpfs_at(f"{run}/../../etc"), "'..'")
    await expect(Code.INTERNAL, tmpfs_at(f"{run}/sneaky/x"), "resolves to /etc/x")
    await expect(Code.INTERNAL, tmpfs_at("relative"), "absolute")
    await expect(
        Code.INTERNAL,
        api.CreateSandbox(
            agent_pb2.CreateSandboxRequest(
                storages=[agent_pb2.Storage(driver="9p", mount_point=f"{run}/x")]
            )
        ),
        "'9p'",
        "supported: local",
    )
    assert not os.path.ismount("/etc")  # nothing was mounted anywhere


async def test_oom_event_from_a_memory_hog(api: Any, rootfs: Path) -> None:
    waiting = asyncio.ensure_future(api.GetOOMEvent(agent_pb2.GetOOMEventRequest()))
    await create_started(api, rootfs, "calm", "/bin/sleep", "300")
    hog = spec(rootfs, "/bin/sh", "-c", "x=$(head -c 200000000 /dev/zero | tr '\\0' x); echo no")
    hog.Linux.Resources.Memory.Limit = 32 << 20
    await api.CreateContainer(agent_pb2.CreateContainerRequest(container_id="hog", OCI=hog))
    await api.StartContainer(agent_pb2.StartContainerRequest(container_id="hog"))
    event = await asyncio.wait_for(waiting, 30)
    assert event.container_id == "hog"
    status = await api.WaitProcess(agent_pb2.WaitProcessRequest(container_id="hog"))
    assert status.status == 128 + signal.SIGKILL


async def test_container_pipe_size_is_honoured(tmp_path: Path, rootfs: Path) -> None:
    import fcntl

    with run_container_agent(tmp_path, cmdline="agent.container_pipe_size=262144") as agent:
        async with await Client.connect(agent.address) as client:
            api = Stub(client, AGENT)
            await create_started(api, rootfs, "p1", "/bin/sleep", "300")
            pid = (tmp_path / "run" / "containers" / "p1" / "init.pid").read_text()
            with open(f"/proc/{pid}/fd/1", "rb") as stdout:
                assert fcntl.fcntl(stdout, 1032) == 262144  # F_GETPIPE_SZ


@pytest.mark.parametrize("read_size", [1000, 32 << 10, 1 << 20])
async def test_output_through_the_default_megabyte_pipe_arrives_whole(
    tmp_path: Path, rootfs: Path, read_size: int
) -> None:
    """With no agent.container_pipe_size the stdout pipe holds 1 MiB (fewer wake-ups
    per megabyte; stderr keeps the kernel's size); megabytes of distinct lines, read
    in any size, lose and reorder nothing."""
    import fcntl

    with run_container_agent(tmp_path) as agent:
        async with await Client.connect(agent.address) as client:
            api = Stub(client, AGENT)
            await create_started(api, rootfs, "lines", "/bin/sh", "-c", "sleep 0.2; seq 1 400000")
            pid = (tmp_path / "run" / "containers" / "lines" / "init.pid").read_text()
            with open(f"/proc/{pid}/fd/1", "rb") as stdout:
                assert fcntl.fcntl(stdout, 1032) == 1 << 20  # F_GETPIPE_SZ
            with open(f"/proc/{pid}/fd/2", "rb") as stderr:
                assert fcntl.fcntl(stderr, 1032) < 1 << 20  # the kernel's default
            chunks = []
            request = agent_pb2.ReadStreamRequest(container_id="lines", len=read_size)
            while data := (await api.ReadStdout(request)).data:
                assert len(data) <= read_size
                chunks.append(data)
    expected = "".join(f"{n}\n" for n in range(1, 400001)).encode()
    assert b"".join(chunks) == expected
