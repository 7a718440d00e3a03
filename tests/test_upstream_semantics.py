"""Upstream's semantics where the Kata runtime relies on them, on real containers.

PID namespaces from the spec the runtime sends, end of stream without loss,
WaitProcess and SignalProcess as upstream's agent answers them, the
termination message, and DestroySandbox stand-alone (docs/api.md).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from pykata.api import agent_pb2
from pykata.ttrpc import Client, Code, Stub, TtrpcError

from .conftest import AgentProcess, run_container_agent
from .containers import as_the_kata_runtime_sends, process, spec

AGENT = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
R = agent_pb2


@pytest.fixture(params=["crun", "runc"])
def agent_proc(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[AgentProcess]:
    with run_container_agent(tmp_path, str(request.param)) as agent:
        yield agent


@pytest.fixture
async def api(agent_proc: AgentProcess) -> AsyncIterator[Any]:
    async with await Client.connect(agent_proc.address) as client:
        yield Stub(client, AGENT)


async def output_of(api: Any, cid: str, exec_id: str = "", size: int = 32768) -> bytes:
    """ReadStdout until the end of the stream (empty data), as the shim reads."""
    chunks = []
    request = R.ReadStreamRequest(container_id=cid, exec_id=exec_id, len=size)
    while data := (await api.ReadStdout(request)).data:
        chunks.append(data)
    return b"".join(chunks)


async def start(api: Any, cid: str, message: Any, **request: Any) -> None:
    await api.CreateContainer(
        R.CreateContainerRequest(container_id=cid, exec_id=cid, OCI=message, **request)
    )
    await api.StartContainer(R.StartContainerRequest(container_id=cid))


LIST_PROCESSES = "echo self=$$; for d in /proc/[0-9]*; do echo $(cat $d/comm); done"


async def test_runtime_spec_without_pid_namespace_gets_a_new_one(api: Any, rootfs: Path) -> None:
    await api.CreateSandbox(R.CreateSandboxRequest(sandbox_id="pidns", hostname="pidns"))
    message = as_the_kata_runtime_sends(spec(rootfs, "/bin/sh", "-c", LIST_PROCESSES))
    assert not [ns for ns in message.Linux.Namespaces if ns.Type == "pid"]
    await start(api, "seer", message)
    lines = (await output_of(api, "seer")).decode().split()
    # Its init is PID 1, and the only processes it can see are its own: no agent,
    # no runtime, nothing of the host's.
    assert lines[0] == "self=1"
    assert set(lines[1:]) <= {"sh", "cat"}, lines
    assert (await api.WaitProcess(R.WaitProcessRequest(container_id="seer"))).status == 0


async def test_a_pid_namespace_by_path_in_the_spec_is_not_joined(api: Any, rootfs: Path) -> None:
    message = spec(rootfs, "/bin/sh", "-c", "echo self=$$")
    for ns in message.Linux.Namespaces:
        if ns.Type == "pid":
            ns.Path = f"/proc/{os.getpid()}/ns/pid"  # the host's (the test runner's)
    await start(api, "joiner", message)
    assert await output_of(api, "joiner") == b"self=1\n"


async def test_sandbox_pidns_shares_the_first_containers_namespace(api: Any, rootfs: Path) -> None:
    await api.CreateSandbox(R.CreateSandboxRequest(sandbox_id="shared"))
    infra = as_the_kata_runtime_sends(spec(rootfs, "/bin/sleep", "300"))
    await start(api, "infra", infra)
    peer = as_the_kata_runtime_sends(spec(rootfs, "/bin/sh", "-c", LIST_PROCESSES))
    await start(api, "peer", peer, sandbox_pidns=True)
    lines = (await output_of(api, "peer")).decode().split()
    assert lines[0] != "self=1"  # the infra container's sleep is PID 1
    assert "sleep" in lines[1:], lines
    alone = as_the_kata_runtime_sends(spec(rootfs, "/bin/sh", "-c", LIST_PROCESSES))
    await start(api, "alone", alone)
    assert (await output_of(api, "alone")).decode().split()[0] == "self=1"
    # once the namespace's container is gone, sharing it is refused
    await api.RemoveContainer(R.RemoveContainerRequest(container_id="infra"))
    with pytest.raises(TtrpcError) as exc:
        await api.CreateContainer(
            R.CreateContainerRequest(
                container_id="late", OCI=spec(rootfs, "/bin/true"), sandbox_pidns=True
            )
        )
    assert exc.value.code == Code.INTERNAL and "PID namespace" in exc.value.message


@pytest.mark.load
async def test_no_output_is_lost_over_many_short_execs(api: Any, rootfs: Path) -> None:
    """End of stream is the pipe's end of file: every byte first, however quick the exit
    (upstream gives up 500 ms after the exit and can lose output: issue #9071)."""
    await start(api, "host", spec(rootfs, "/bin/sleep", "300"))
    payload = "x" * 3000
    for n in range(200):
        exec_id = f"e{n}"
        await api.ExecProcess(
            R.ExecProcessRequest(
                container_id="host",
                exec_id=exec_id,
                process=process("/bin/sh", "-c", f"echo {n}; printf {payload}; echo end-{n}"),
            )
        )
        out = await output_of(api, "host", exec_id)
        assert out == f"{n}\n{payload}end-{n}\n".encode(), (n, len(out))
        status = await api.WaitProcess(R.WaitProcessRequest(container_id="host", exec_id=exec_id))
        assert status.status == 0


async def test_output_is_kept_when_waited_first_and_no_fds_are_held(
    api: Any, rootfs: Path, agent_proc: AgentProcess
) -> None:
    await start(api, "host", spec(rootfs, "/bin/sleep", "300"))
    before = len(os.listdir(f"/proc/{agent_proc.proc.pid}/fd"))
    for n in range(30):
        await api.ExecProcess(
            R.ExecProcessRequest(
                container_id="host",
                exec_id=f"w{n}",
                process=process("/bin/sh", "-c", f"echo out-{n}; echo err-{n} >&2"),
            )
        )
    for n in range(30):
        status = await api.WaitProcess(R.WaitProcessRequest(container_id="host", exec_id=f"w{n}"))
        assert status.status == 0
    # Exited and waited, output unread: the agent holds no descriptor for them...
    await asyncio.sleep(0.2)
    assert len(os.listdir(f"/proc/{agent_proc.proc.pid}/fd")) <= before
    # ...and every byte is still there, then the end of stream, then the exec is gone.
    for n in range(30):
        assert await output_of(api, "host", f"w{n}") == f"out-{n}\n".encode()
        err = await api.ReadStderr(
            R.ReadStreamRequest(container_id="host", exec_id=f"w{n}", len=99)
        )
        assert err.data == f"err-{n}\n".encode()


async def test_wait_answers_every_waiter_once(api: Any, rootfs: Path) -> None:
    await start(api, "host", spec(rootfs, "/bin/sleep", "300"))
    await api.ExecProcess(
        R.ExecProcessRequest(
            container_id="host",
            exec_id="slow",
            process=process("/bin/sh", "-c", "sleep 0.3; exit 4"),
        )
    )
    request = R.WaitProcessRequest(container_id="host", exec_id="slow")
    first, second = await asyncio.gather(api.WaitProcess(request), api.WaitProcess(request))
    assert (first.status, second.status) == (4, 4)
    with pytest.raises(TtrpcError) as exc:
        await api.WaitProcess(request)
    assert exc.value.code == Code.NOT_FOUND and "slow" in exc.value.message


async def test_kill_all_reaches_every_process_of_the_container(api: Any, rootfs: Path) -> None:
    await start(api, "many", spec(rootfs, "/bin/sh", "-c", "sleep 300 & sleep 300 & wait"))
    await api.ExecProcess(
        R.ExecProcessRequest(
            container_id="many", exec_id="ex", process=process("/bin/sleep", "300")
        )
    )
    await api.SignalProcess(R.SignalProcessRequest(container_id="many", signal=signal.SIGKILL))
    init = await api.WaitProcess(R.WaitProcessRequest(container_id="many"))
    exec_ = await api.WaitProcess(R.WaitProcessRequest(container_id="many", exec_id="ex"))
    assert (init.status, exec_.status) == (128 + signal.SIGKILL, 128 + signal.SIGKILL)


async def test_sigterm_to_an_init_without_a_handler_kills_it(
    api: Any, rootfs: Path, tmp_path: Path
) -> None:
    """PID 1 of a namespace never sees a signal it has no handler for: upstream sends
    SIGKILL instead, so `kill` (SIGTERM) from the runtime still stops the container."""
    await start(api, "stubborn", spec(rootfs, "/bin/sleep", "300"))
    # Readiness by retry: right after StartContainer the process may still be the
    # runtime's own init (runc's catches SIGTERM), not yet the container's command.
    pid = (tmp_path / "run" / "containers" / "stubborn" / "init.pid").read_text()
    for _ in range(500):
        if os.readlink(f"/proc/{pid}/exe").endswith("busybox"):
            break
        await asyncio.sleep(0.01)
    await api.SignalProcess(R.SignalProcessRequest(container_id="stubborn", signal=signal.SIGTERM))
    status = await api.WaitProcess(R.WaitProcessRequest(container_id="stubborn"))
    assert status.status == 128 + signal.SIGKILL
    script = "trap 'echo got-term; exit 5' TERM; echo ready; while :; do sleep 0.05; done"
    await start(api, "handler", spec(rootfs, "/bin/sh", "-c", script))
    first = await api.ReadStdout(R.ReadStreamRequest(container_id="handler", len=100))
    assert first.data == b"ready\n"
    await api.SignalProcess(R.SignalProcessRequest(container_id="handler", signal=signal.SIGTERM))
    assert await output_of(api, "handler") == b"got-term\n"
    assert (await api.WaitProcess(R.WaitProcessRequest(container_id="handler"))).status == 5


async def test_termination_message_of_a_kubernetes_container(
    api: Any, rootfs: Path, tmp_path: Path
) -> None:
    shared = tmp_path / "run" / "shared" / "containers"
    await api.CopyFile(
        R.CopyFileRequest(path=str(shared / "tm-termination-log"), file_size=0, file_mode=0o100666)
    )
    message = spec(rootfs, "/bin/sh", "-c", "echo -n 'it ended badly' > /dev/termination-log")
    message.Annotations["io.kubernetes.container.terminationMessagePath"] = "/dev/termination-log"
    message.Mounts.add(
        destination="/dev/termination-log",
        source=str(shared / "tm-termination-log"),
        type="bind",
        options=["rbind", "rw"],
    )
    await start(api, "tm", message)
    await api.WaitProcess(R.WaitProcessRequest(container_id="tm"))
    reply = await api.GetDiagnosticData(
        R.GetDiagnosticDataRequest(log_type="termination_log", container_id="tm")
    )
    assert reply.data == "it ended badly"
    # A source outside the shared-files directory is not read (upstream would).
    outside = spec(rootfs, "/bin/true")
    outside.Annotations["io.kubernetes.container.terminationMessagePath"] = "/x"
    outside.Mounts.add(destination="/x", source="/etc/passwd", type="bind", options=["rbind"])
    await start(api, "tm2", outside)
    with pytest.raises(TtrpcError) as exc:
        await api.GetDiagnosticData(
            R.GetDiagnosticDataRequest(log_type="termination_log", container_id="tm2")
        )
    assert exc.value.code == Code.INTERNAL and "/etc/passwd" in exc.value.message


async def test_destroy_sandbox_stand_alone_keeps_serving(api: Any, rootfs: Path) -> None:
    for run in range(2):
        await api.CreateSandbox(R.CreateSandboxRequest(sandbox_id=f"sb{run}"))
        await start(api, f"c{run}", spec(rootfs, "/bin/echo", f"run {run}"))
        assert await output_of(api, f"c{run}") == f"run {run}\n".encode()
        await api.DestroySandbox(R.DestroySandboxRequest())
    with pytest.raises(TtrpcError) as exc:
        await api.WaitProcess(R.WaitProcessRequest(container_id="c1"))
    assert exc.value.code == Code.INVALID_ARGUMENT  # removed with its sandbox
