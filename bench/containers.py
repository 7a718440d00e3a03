"""Container benchmarks: the agent against the same OCI runtime invoked directly.

    python bench/containers.py            # prints JSON results

The bare-runtime side runs in a child process that enters a private mount
namespace (as the agent does, so crun works on hybrid-cgroup hosts) and
drives the runtime the way the agent does: create, start, wait, delete.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.containers import build_rootfs, template  # noqa: E402
from tests.peers import go_client, wait_for_socket  # noqa: E402

from pykata import ocispec  # noqa: E402
from pykata.agent import runtime  # noqa: E402
from pykata.agent.reaper import become_subreaper  # noqa: E402
from pykata.api import agent_pb2, oci_pb2  # noqa: E402
from pykata.ttrpc import Client, Stub  # noqa: E402

CYCLES = 30
EXECS = 50
#: Cycles and execs are measured in this many batches, bare and agent in turn.
BATCHES = 5
CONCURRENT = 50
STDOUT_BYTES = 256 << 20
#: The Kata shim's read size.
SHIM_READ = 32 << 10
#: The producer: dd writes a megabyte per call (busybox head -c writes 4 KiB per
#: call and is itself the bottleneck, near 200 MiB/s on these machines).
PRODUCER = f"dd if=/dev/zero bs=1048576 count={STDOUT_BYTES >> 20} 2>/dev/null"


_TEMPLATE: dict[str, Any] = {}


def config(rootfs: Path, *args: str) -> dict[str, Any]:
    """The runtime's default spec for `args` (`runc spec` runs once, outside any timing)."""
    if not _TEMPLATE:
        _TEMPLATE.update(template())
    data = json.loads(json.dumps(_TEMPLATE))
    data["root"] = {"path": str(rootfs)}
    data["process"]["args"] = list(args)
    data["process"]["terminal"] = False
    return data


# --- the bare runtime ---------------------------------------------------------------


async def _bare(binary: str, work: Path, rootfs: Path, batch: int) -> dict[str, Any]:
    """One batch of the bare runtime's cycles and execs (samples in seconds); the
    first batch also starts CONCURRENT containers at once."""
    state = work / "bare-state"

    async def run(*args: str) -> None:
        # No pipes: a container inherits the runtime's stdio and would hold them open.
        log = work / "bare.log"
        proc = await asyncio.create_subprocess_exec(
            binary,
            "--root",
            str(state),
            "--log",
            str(log),
            *args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if await proc.wait():
            raise RuntimeError(f"{binary} {args[0]} failed: {log.read_text()[-500:]}")

    async def lifecycle(cid: str, *args: str) -> None:
        bundle = work / "bare" / cid
        bundle.mkdir(parents=True)
        cfg = config(rootfs, *args)
        cfg["linux"]["cgroupsPath"] = f"/pykata-bench/{cid}"
        (bundle / "config.json").write_text(json.dumps(cfg))
        await run("create", "--bundle", str(bundle), "--pid-file", str(bundle / "pid"), cid)
        await run("start", cid)

    async def wait_exit(cid: str) -> None:
        pid = int((work / "bare" / cid / "pid").read_text())
        fd = os.pidfd_open(pid)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        loop.add_reader(fd, done.set_result, None)
        await done
        loop.remove_reader(fd)
        os.waitid(os.P_PIDFD, fd, os.WEXITED)
        os.close(fd)

    async def delete(cid: str) -> None:
        await run("delete", "--force", cid)
        shutil.rmtree(work / "bare" / cid)

    cycles = []
    for n in range(CYCLES // BATCHES):
        started = time.perf_counter()
        await lifecycle(f"b{batch}-{n}", "/bin/true")
        await wait_exit(f"b{batch}-{n}")
        await delete(f"b{batch}-{n}")
        cycles.append(time.perf_counter() - started)
    await lifecycle(f"bx{batch}", "/bin/sleep", "300")
    execs = []
    for _ in range(EXECS // BATCHES):
        started = time.perf_counter()
        await run("exec", f"bx{batch}", "/bin/true")
        execs.append(time.perf_counter() - started)
    await delete(f"bx{batch}")
    result: dict[str, Any] = {"cycles": cycles, "execs": execs}
    if batch == 0:
        started = time.perf_counter()
        await asyncio.gather(*(lifecycle(f"p{n}", "/bin/sleep", "300") for n in range(CONCURRENT)))
        result["concurrent_s"] = time.perf_counter() - started
        await asyncio.gather(*(delete(f"p{n}") for n in range(CONCURRENT)))
    return result


def bare_main(binary: str, work: str, rootfs: str, batch: str) -> None:
    if os.path.basename(binary) == "crun" and runtime.cgroups_are_hybrid():
        runtime.detach_unified_hierarchy()
    else:
        runtime.enter_private_mount_namespace()
    become_subreaper()
    print(json.dumps(asyncio.run(_bare(binary, Path(work), Path(rootfs), int(batch)))))


# --- through the agent ------------------------------------------------------------------


async def read_output(
    api: Any, create_start: Any, cid: str, size: int, go_socket: str | None = None
) -> float:
    """MiB/s of STDOUT_BYTES read with ReadStdout calls of `size` bytes: by our
    client, or (`go_socket`) by containerd's Go ttRPC client, as the Kata shim reads."""
    await create_start(cid, "/bin/sh", "-c", PRODUCER)
    if go_socket is not None:
        request = json.dumps({"container_id": cid, "len": size})
        [result] = await asyncio.to_thread(go_client, go_socket, "read-stdout", "-request", request)
        received, throughput = result["bytes"], result["mib_s"]
    else:
        received = 0
        started = time.perf_counter()
        request_ = agent_pb2.ReadStreamRequest(container_id=cid, len=size)
        while data := (await api.ReadStdout(request_)).data:
            received += len(data)
        throughput = received / (time.perf_counter() - started) / (1 << 20)
    assert received == STDOUT_BYTES, received
    await api.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id=cid))
    return throughput


async def _create_start(api: Stub, rootfs: Path, cid: str, *args: str) -> None:
    """Create and start container `cid` running `args` through the agent."""
    spec = oci_pb2.Spec()
    ocispec.from_json(config(rootfs, *args), spec)
    await api.CreateContainer(agent_pb2.CreateContainerRequest(container_id=cid, OCI=spec))
    await api.StartContainer(agent_pb2.StartContainerRequest(container_id=cid))


async def _agent_batch(address: str, rootfs: Path, batch: int) -> dict[str, Any]:
    """One batch of cycles and execs through the agent (samples in seconds)."""
    async with await Client.connect(address) as client:
        api = Stub(client, agent_pb2.DESCRIPTOR.services_by_name["AgentService"])
        create_start = functools.partial(_create_start, api, rootfs)

        cycles = []
        for n in range(CYCLES // BATCHES):
            cid = f"a{batch}-{n}"
            started = time.perf_counter()
            await create_start(cid, "/bin/true")
            await api.WaitProcess(agent_pb2.WaitProcessRequest(container_id=cid))
            await api.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id=cid))
            cycles.append(time.perf_counter() - started)
        await create_start(f"ax{batch}", "/bin/sleep", "300")
        execs = []
        true = oci_pb2.Process(Args=["/bin/true"], Cwd="/")
        for n in range(EXECS // BATCHES):
            exec_ = agent_pb2.ExecProcessRequest(
                container_id=f"ax{batch}", exec_id=f"e{n}", process=true
            )
            started = time.perf_counter()
            await api.ExecProcess(exec_)
            await api.WaitProcess(
                agent_pb2.WaitProcessRequest(container_id=f"ax{batch}", exec_id=f"e{n}")
            )
            execs.append(time.perf_counter() - started)
        await api.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id=f"ax{batch}"))
    return {"cycles": cycles, "execs": execs}


async def _agent(address: str, rootfs: Path) -> dict[str, Any]:
    async with await Client.connect(address) as client:
        api = Stub(client, agent_pb2.DESCRIPTOR.services_by_name["AgentService"])
        create_start = functools.partial(_create_start, api, rootfs)

        go_socket = address.removeprefix("unix://")
        throughput = {
            size: await read_output(api, create_start, f"out{size}", size)
            for size in (1 << 20, SHIM_READ)
        }
        go_throughput = {
            size: await read_output(api, create_start, f"go{size}", size, go_socket)
            for size in (1 << 20, SHIM_READ)
        }

        started = time.perf_counter()
        await asyncio.gather(
            *(create_start(f"p{n}", "/bin/sleep", "300") for n in range(CONCURRENT))
        )
        concurrent = time.perf_counter() - started
        await asyncio.gather(
            *(
                api.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id=f"p{n}"))
                for n in range(CONCURRENT)
            )
        )
    return {
        "stdout_mib_s": go_throughput[1 << 20],
        "stdout_mib_s_32k": go_throughput[SHIM_READ],
        "stdout_mib_s_py": throughput[1 << 20],
        "stdout_mib_s_32k_py": throughput[SHIM_READ],
        "concurrent_s": concurrent,
    }


def measure() -> dict[str, Any]:
    binary = shutil.which("crun") or shutil.which("runc")
    assert binary
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rootfs = build_rootfs(work / "rootfs")
        (work / "cmdline").write_text("")
        env = {
            **os.environ,
            "KATA_AGENT_SERVER_ADDR": f"unix://{tmp}/agent.sock",
            "KATA_AGENT_RUN_DIR": f"{tmp}/run",
            "KATA_AGENT_OCI_RUNTIME": binary,
            "KATA_AGENT_LOG_LEVEL": "warn",
        }
        agent = subprocess.Popen(
            [sys.executable, "-m", "pykata.agent.cli", "--kernel-cmdline", f"{tmp}/cmdline"],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_socket(f"{tmp}/agent.sock", proc=agent)
            import uvloop

            # Batches in turn, bare then agent: a spell of other load on this shared
            # machine falls on both sides rather than on one.
            bare: dict[str, Any] = {"cycles": [], "execs": []}
            through: dict[str, Any] = {"cycles": [], "execs": []}
            for batch in range(BATCHES):
                done = json.loads(
                    subprocess.run(
                        [sys.executable, __file__, "--bare", binary, tmp, str(rootfs), str(batch)],
                        capture_output=True,
                        text=True,
                        check=True,
                        timeout=600,
                    ).stdout
                )
                for key in ("cycles", "execs"):
                    bare[key] += done[key]
                bare.setdefault("concurrent_s", done.get("concurrent_s"))
                done = uvloop.run(_agent_batch(f"unix://{tmp}/agent.sock", rootfs, batch))
                for key in ("cycles", "execs"):
                    through[key] += done[key]
            through.update(uvloop.run(_agent(f"unix://{tmp}/agent.sock", rootfs)))
        finally:
            agent.terminate()
            agent.wait(30)
    for side in (bare, through):
        side["cycle_ms"] = statistics.median(side.pop("cycles")) * 1e3
        side["exec_ms"] = statistics.median(side.pop("execs")) * 1e3
    return {"runtime": os.path.basename(binary), "bare": bare, "agent": through}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bare"]:
        bare_main(*sys.argv[2:6])
    else:
        print(json.dumps(measure(), indent=1))
