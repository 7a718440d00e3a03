"""The agent against requests meant to hurt it, and after a kill -9 (issue findings).

Ids that are paths, two writers on one stdin, writes that never drain, files
planted where CopyFile writes, storages over the agent's own state, and an
agent killed in the middle of its work: each answered with the right code
and a message naming the problem, nothing written outside the run directory,
no call left hanging, and a restarted agent that cleans up after the dead one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from pykata.agent.runtime import LOG_DIR
from pykata.api import agent_pb2
from pykata.ttrpc import Client, Code, Stub, TtrpcError

from .attack import until
from .conftest import AgentProcess, run_container_agent
from .containers import leftovers, process, spec
from .peers import processes_with

AGENT = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
R = agent_pb2
MiB = 1 << 20


@pytest.fixture
def agent_proc(tmp_path: Path) -> Iterator[AgentProcess]:
    with run_container_agent(tmp_path) as agent:
        yield agent


@pytest.fixture
async def api(agent_proc: AgentProcess) -> AsyncIterator[Any]:
    async with await Client.connect(agent_proc.address) as client:
        yield Stub(client, AGENT)


async def start(api: Any, rootfs: Path, cid: str, *args: str) -> None:
    await api.CreateContainer(R.CreateContainerRequest(container_id=cid, OCI=spec(rootfs, *args)))
    await api.StartContainer(R.StartContainerRequest(container_id=cid))


async def refused(call: Any, code: Code, *words: str) -> TtrpcError:
    with pytest.raises(TtrpcError) as exc:
        await call
    assert exc.value.code == code, exc.value
    for word in words:
        assert word in exc.value.message, exc.value.message
    return exc.value


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def files_below(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


HOSTILE_IDS = ["../../../../tmp/pykata-escape", "a/b", "x\0y", ".hidden", "-flag", "z" * 300]


async def test_ids_that_are_not_file_names_are_refused_everywhere(
    api: Any, rootfs: Path, tmp_path: Path, agent_proc: AgentProcess
) -> None:
    await start(api, rootfs, "host", "/bin/sleep", "300")
    before = files_below(tmp_path.parent)
    for bad in HOSTILE_IDS:
        calls = {
            "container_id": api.CreateContainer(
                R.CreateContainerRequest(container_id=bad, OCI=spec(rootfs, "/bin/true"))
            ),
            "exec_id": api.ExecProcess(
                R.ExecProcessRequest(container_id="host", exec_id=bad, process=process("/bin/true"))
            ),
            "sandbox_id": api.CreateSandbox(R.CreateSandboxRequest(sandbox_id=bad)),
        }
        for field, call in calls.items():
            await refused(call, Code.INVALID_ARGUMENT, field, "not a valid id")
        # lookups too, in every RPC that takes an id
        await refused(
            api.WaitProcess(R.WaitProcessRequest(container_id="host", exec_id=bad)),
            Code.INVALID_ARGUMENT,
            "exec_id",
        )
        await refused(
            api.ReadStdout(R.ReadStreamRequest(container_id=bad, len=1)),
            Code.INVALID_ARGUMENT,
            "container_id",
        )
    # Nothing was written anywhere outside the run directory (all of pytest's tmp tree).
    created = files_below(tmp_path.parent) - before
    assert [f for f in created if not f.startswith(str(tmp_path / "run"))] == []
    assert not Path("/tmp/pykata-escape.process.json").exists()
    assert not Path("/tmp/pykata-escape.pid").exists()
    await start(api, rootfs, "still", "/bin/true")  # and it still serves


async def test_concurrent_writes_to_one_stdin_arrive_whole_and_in_order(
    api: Any, rootfs: Path
) -> None:
    # The process reads only after a while: the first write fills the pipe and the
    # others must queue behind it, each one answered, none interleaved.
    await start(api, rootfs, "slow", "/bin/sh", "-c", "sleep 0.5; exec cat")
    chunks = [bytes([65 + n]) * (300_000 + n) for n in range(6)]
    writes = [api.WriteStdin(R.WriteStreamRequest(container_id="slow", data=c)) for c in chunks]

    async def read_everything() -> bytes:
        total = sum(len(c) for c in chunks)
        out = b""
        while len(out) < total:
            out += (await api.ReadStdout(R.ReadStreamRequest(container_id="slow", len=MiB))).data
        return out

    *answers, output = await asyncio.gather(*writes, read_everything())
    assert [a.len for a in answers] == [len(c) for c in chunks]
    assert output == b"".join(chunks)


async def test_pending_writes_are_bounded_and_answered_when_the_container_goes(
    api: Any, rootfs: Path, agent_proc: AgentProcess
) -> None:
    await start(api, rootfs, "deaf", "/bin/sleep", "300")  # never reads its stdin
    baseline = rss_mb(agent_proc.proc.pid)
    writes = [
        asyncio.ensure_future(
            api.WriteStdin(R.WriteStreamRequest(container_id="deaf", data=bytes(4 * MiB - 64)))
        )
        for _ in range(40)
    ]
    # At most two 4 MiB writes fit the 8 MiB bound, and one more is being written:
    # every other write is refused, however slowly the 160 MiB arrive.
    await until(lambda: sum(w.done() for w in writes) >= len(writes) - 3)
    full = [w for w in writes if w.done()]
    assert full, "no write was refused"
    for w in full:
        exc = w.exception()
        assert isinstance(exc, TtrpcError) and exc.code == Code.RESOURCE_EXHAUSTED, exc
        assert "deaf" in exc.message and "limit" in exc.message
    # What the agent holds for them is bounded by the limit (8 MiB waiting, and the one
    # write in progress), times the copies of a request: not the 160 MiB sent (~500 MB).
    assert rss_mb(agent_proc.proc.pid) - baseline < 80
    await api.RemoveContainer(R.RemoveContainerRequest(container_id="deaf"))
    # Every waiting write is answered once the container is gone; none hangs.
    done, pending = await asyncio.wait(writes, timeout=30)
    assert not pending
    for w in done:
        exc = w.exception()
        assert isinstance(exc, TtrpcError) and exc.code in (Code.INTERNAL, Code.RESOURCE_EXHAUSTED)


async def test_pending_writes_are_answered_when_the_process_exits(api: Any, rootfs: Path) -> None:
    await start(api, rootfs, "brief", "/bin/sh", "-c", "sleep 1")
    writes = [
        api.WriteStdin(R.WriteStreamRequest(container_id="brief", data=bytes(MiB)))
        for _ in range(3)
    ]
    results = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), 60)
    failures = [r for r in results if isinstance(r, TtrpcError)]
    # Pending at the exit: "exited"; a write that a slow machine delivers only after
    # it: stdin "is closed". Every call is answered either way.
    assert failures, results
    for failure in failures:
        assert failure.code == Code.INTERNAL, failure
        assert "exited" in failure.message or "is closed" in failure.message, failure


async def test_a_planted_link_never_redirects_copy_file(api: Any, tmp_path: Path) -> None:
    shared = tmp_path / "run" / "shared" / "containers"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (shared / "c1").mkdir(parents=True)
    partial = shared / "c1" / ".pykata-partial-hosts"
    os.link(victim, partial)  # a hard link, planted before the copy starts
    data = b"127.0.0.1 localhost\n"
    await api.CopyFile(
        R.CopyFileRequest(
            path=str(shared / "c1/hosts"), data=data, file_size=len(data), file_mode=0o100644
        )
    )
    assert (shared / "c1/hosts").read_bytes() == data and victim.read_text() == "precious"
    # planted between two chunks
    target = shared / "c1/big"
    first = R.CopyFileRequest(path=str(target), data=b"a" * 10, file_size=20, file_mode=0o100644)
    await api.CopyFile(first)
    partial = shared / "c1" / ".pykata-partial-big"
    partial.unlink()
    os.link(victim, partial)
    second = R.CopyFileRequest(
        path=str(target), data=b"b" * 10, offset=10, file_size=20, file_mode=0o100644
    )
    await refused(api.CopyFile(second), Code.INTERNAL, "replaced")
    assert victim.read_text() == "precious" and not target.exists()


async def test_failed_and_impossible_copies_leave_nothing(api: Any, tmp_path: Path) -> None:
    shared = tmp_path / "run" / "shared" / "containers"
    target = shared / "c2" / "f"
    await api.CopyFile(
        R.CopyFileRequest(path=str(target), data=b"abc", file_size=9, file_mode=0o100644)
    )
    out_of_order = R.CopyFileRequest(
        path=str(target), data=b"ghi", offset=6, file_size=9, file_mode=0o100644
    )
    await refused(api.CopyFile(out_of_order), Code.INTERNAL, "offset 6")
    assert os.listdir(target.parent) == []  # the failed copy's partial file is gone
    huge = R.CopyFileRequest(path=str(target), data=b"x", file_size=1 << 62, file_mode=0o100644)
    await refused(api.CopyFile(huge), Code.INTERNAL, str(1 << 62), "free")
    assert os.listdir(target.parent) == []


async def test_storages_cannot_cover_the_agents_own_state(
    api: Any, rootfs: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    await start(api, rootfs, "keep", "/bin/sleep", "300")  # its state must stay visible
    for point in (
        run,
        run / "runtime",
        run / "containers",
        run / "containers/keep",
        run / "sandbox",
    ):
        storage = R.Storage(driver="ephemeral", source="tmpfs", mount_point=str(point))
        await refused(
            api.CreateSandbox(R.CreateSandboxRequest(storages=[storage])),
            Code.INTERNAL,
            str(point),
        )
    assert (run / "containers/keep/config.json").exists()
    await api.PauseContainer(R.PauseContainerRequest(container_id="keep"))  # the runtime works
    await api.ResumeContainer(R.ResumeContainerRequest(container_id="keep"))


def runtime_processes(run_dir: Path) -> list[str]:
    return processes_with("--root", str(run_dir / "runtime"))


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.03, 0.08])
async def test_kill_9_during_create_then_restart_cleans_up(
    tmp_path: Path, rootfs: Path, delay: float
) -> None:
    run = tmp_path / "run"
    # The sandbox id names the cgroup parent: one per case, as these run side by side.
    sandbox = f"crashy{round(delay * 100)}"
    with run_container_agent(tmp_path) as agent:
        async with await Client.connect(agent.address) as client:
            api = Stub(client, AGENT)
            await api.CreateSandbox(R.CreateSandboxRequest(sandbox_id=sandbox))
            await start(api, rootfs, "running", "/bin/sleep", "300")
            await api.ExecProcess(
                R.ExecProcessRequest(
                    container_id="running", exec_id="ex", process=process("/bin/sleep", "300")
                )
            )
            creating = asyncio.ensure_future(
                api.CreateContainer(
                    R.CreateContainerRequest(
                        container_id="midway", OCI=spec(rootfs, "/bin/sleep", "300")
                    )
                )
            )
            await asyncio.sleep(delay)
            agent.proc.send_signal(signal.SIGKILL)
            agent.proc.wait()
            await asyncio.gather(creating, return_exceptions=True)
    assert leftovers(sandbox, run)  # the dead agent's containers are still there
    with run_container_agent(tmp_path) as agent:
        async with await Client.connect(agent.address) as client:
            # everything the dead agent left is gone before the new one answers
            assert leftovers(sandbox, run) == []
            assert runtime_processes(run) == []
            # No container's state; the runtime's log files (emptied, used again) stay.
            state = [p.name for p in (run / "runtime").iterdir() if p.is_dir()]
            assert state in ([], [LOG_DIR])
            assert not (run / "sandbox").exists()
            api = Stub(client, AGENT)
            for cid in ("running", "midway"):  # the same ids work again
                await start(api, rootfs, cid, "/bin/true")
                assert (await api.WaitProcess(R.WaitProcessRequest(container_id=cid))).status == 0
        assert agent.stop() == 0
    removed = [line for line in agent.log_lines() if "previous agent" in str(line["msg"])]
    assert removed, "the clean-up says what it removed"


async def test_stale_copy_file_partials_are_removed_at_start(tmp_path: Path) -> None:
    shared = tmp_path / "run" / "shared" / "containers" / "c9"
    shared.mkdir(parents=True)
    (shared / ".pykata-partial-resolv.conf").write_bytes(b"half")
    (shared / "kept").write_bytes(b"whole")
    with run_container_agent(tmp_path):
        assert sorted(os.listdir(shared)) == ["kept"]
    assert stat.S_ISREG((shared / "kept").stat().st_mode)
