"""The agent's services in-process: the same parts, interceptors and ttRPC framing as
kata-agent, wired to a client over a socketpair (pykata.agent.testing), so the
service and domain layers are tested without spawning an agent. Containers are
real (runc, the busybox rootfs)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pykata.agent.testing import InProcessAgent, agent_for
from pykata.api import agent_pb2, health_pb2
from pykata.ttrpc import Code, TtrpcError

from .containers import process, spec

R = agent_pb2


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[InProcessAgent]:
    async with agent_for(tmp_path / "run") as serving:
        yield serving


async def refused(call: object, code: Code, *words: str) -> str:
    with pytest.raises(TtrpcError) as exc:
        await call  # type: ignore[misc]
    assert exc.value.code == code, exc.value
    for word in words:
        assert word in exc.value.message, exc.value.message
    return exc.value.message


async def output(agent: InProcessAgent, cid: str, exec_id: str = "") -> bytes:
    """Everything the process writes to stdout, up to end of stream."""
    out = b""
    while chunk := (
        await agent.api.ReadStdout(R.ReadStreamRequest(container_id=cid, exec_id=exec_id, len=4096))
    ).data:
        out += chunk
    return out


async def test_health_answers_in_process(agent: InProcessAgent) -> None:
    check = await agent.health.Check(health_pb2.CheckRequest())
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    version = await agent.health.Version(health_pb2.CheckRequest())
    assert version.agent_version and version.grpc_version


async def test_a_container_runs_and_its_exit_and_output_come_back(
    agent: InProcessAgent, rootfs: Path
) -> None:
    message = spec(rootfs, "/bin/sh", "-c", "echo hello from $(hostname); exit 7")
    await agent.api.CreateContainer(R.CreateContainerRequest(container_id="c1", OCI=message))
    await agent.api.StartContainer(R.StartContainerRequest(container_id="c1"))
    assert await output(agent, "c1") == b"hello from runc\n"  # the template's hostname
    waited = await agent.api.WaitProcess(R.WaitProcessRequest(container_id="c1"))
    assert waited.status == 7
    # The domain keeps the container until it is removed; then nothing of it is left.
    assert list(agent.parts.sandbox.containers) == ["c1"]
    await agent.api.RemoveContainer(R.RemoveContainerRequest(container_id="c1"))
    assert agent.parts.sandbox.containers == {}


async def test_an_exec_in_a_running_container(agent: InProcessAgent, rootfs: Path) -> None:
    await agent.api.CreateContainer(
        R.CreateContainerRequest(container_id="app", OCI=spec(rootfs, "/bin/sleep", "300"))
    )
    await agent.api.StartContainer(R.StartContainerRequest(container_id="app"))
    await agent.api.ExecProcess(
        R.ExecProcessRequest(container_id="app", exec_id="e1", process=process("/bin/echo", "hi"))
    )
    assert await output(agent, "app", "e1") == b"hi\n"
    waited = await agent.api.WaitProcess(R.WaitProcessRequest(container_id="app", exec_id="e1"))
    assert waited.status == 0


@pytest.mark.parametrize("bad_id", ["../../tmp/x", "a/b", "x\0y", "", "-leading", "a" * 129])
async def test_hostile_ids_are_refused_before_anything_is_made(
    agent: InProcessAgent, rootfs: Path, tmp_path: Path, bad_id: str
) -> None:
    request = R.CreateContainerRequest(container_id=bad_id, OCI=spec(rootfs, "/bin/true"))
    await refused(
        agent.api.CreateContainer(request), Code.INVALID_ARGUMENT, "container_id", "not a valid id"
    )
    bundles = tmp_path / "run" / "containers"
    assert not bundles.exists() or os.listdir(bundles) == []


async def test_unknown_containers_answer_upstreams_codes(agent: InProcessAgent) -> None:
    # docs/api.md, "Status codes": upstream answers INTERNAL here (rpc.rs).
    await refused(
        agent.api.StartContainer(R.StartContainerRequest(container_id="nobody")),
        Code.INTERNAL,
        "nobody",
    )
    await refused(
        agent.api.RemoveContainer(R.RemoveContainerRequest(container_id="nobody")),
        Code.INTERNAL,
        "nobody",
    )


async def test_copy_file_writes_only_below_the_shared_containers_dir(
    agent: InProcessAgent, tmp_path: Path
) -> None:
    shared = tmp_path / "run" / "shared" / "containers"
    inside = shared / "c1" / "hosts"
    await agent.api.CopyFile(
        R.CopyFileRequest(
            path=str(inside), file_size=3, file_mode=0o644, dir_mode=0o755, data=b"abc"
        )
    )
    assert inside.read_bytes() == b"abc"
    outside = tmp_path / "run" / "sandbox-escape"
    await refused(
        agent.api.CopyFile(R.CopyFileRequest(path=str(outside), file_size=1, data=b"x")),
        Code.INTERNAL,
        str(outside),
    )
    assert not outside.exists()


async def test_the_policy_interceptor_decides_before_the_service_acts(
    tmp_path: Path, rootfs: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        'default = "allow"\n'
        "[[rules]]\n"
        'name = "no containers"\n'
        'methods = ["CreateContainer"]\n'
        'decision = "deny"\n'
    )
    async with agent_for(tmp_path / "run", policy_file=str(policy)) as agent:
        request = R.CreateContainerRequest(container_id="c1", OCI=spec(rootfs, "/bin/true"))
        await refused(agent.api.CreateContainer(request), Code.PERMISSION_DENIED, "no containers")
        assert agent.parts.sandbox.containers == {}
        await agent.health.Check(health_pb2.CheckRequest())  # other calls still served
