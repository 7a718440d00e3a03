"""Real containers under crun and runc, driven through a real kata-agent process."""

from __future__ import annotations

import asyncio
import os
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
            reply = await method(agent_pb2.ReadStreamRequest(
                container_id=cid, exec_id=exec_id, len=65536))
        except TtrpcError as exc:
            assert exc.code == Code.OUT_OF_RANGE, exc
            return b"".join(chunks)
        chunks.append(reply.data)


async def test_lifecycle_output_and_exit_code(api: Any, rootfs: Path, tmp_path: Path) -> None:
    await api.CreateContainer(agent_pb2.CreateContainerRequest(
        container_id="c1", exec_id="c1",
        OCI=spec(rootfs, "/bin/sh", "-c", "echo out; echo err >&2; exit 7")))
    assert (tmp_path / "run" / "containers" / "c1" / "config.json").exists()
    await api.StartContainer(agent_pb2.StartContainerRequest(container_id="c1"))
    out, err, status = await asyncio.gather(
        read_all(api, "c1"), read_all(api, "c1", stream="stderr"),
        api.WaitProcess(agent_pb2.WaitProcessRequest(container_id="c1")))
    assert (out, err, status.status) == (b"out\n", b"err\n", 7)
    await api.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id="c1"))
    assert not (tmp_path / "run" / "containers" / "c1").exists()
    with pytest.raises(TtrpcError) as exc:
        await api.StartContainer(agent_pb2.StartContainerRequest(container_id="c1"))
    assert exc.value.code == Code.NOT_FOUND and "c1" in exc.value.message
