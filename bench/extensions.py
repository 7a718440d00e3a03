"""pykata.Extensions measured (not tested): port forwarding, cp, streaming exec.

    python bench/extensions.py          # prints JSON results

- port forward: MiB/s each way through one forward (a 256 MiB stream from
  and to `nc` in the sandbox), and connection set-up: from opening the
  PortForward stream to the agent's "opened" (connected in the sandbox).
- cp: MiB/s of a 512 MiB file uploaded into a container and downloaded back
  (SHA-256 on both ends included), through the library as kata-agent-ctl cp uses it.
- streaming exec: MiB/s of 1 GiB of stdout (`dd bs=1M`) through Exec and, in
  the same run, through the ReadStdout loop (1 MiB reads); and, for short
  execs, the time from the last output byte to the exit status arriving.
- the CPU time the agent and this client spent on each of those (the machine
  is shared: wall-clock rates depend on the other load, CPU per GiB less so).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.containers import build_rootfs, process, spec  # noqa: E402
from tests.peers import wait_for_socket  # noqa: E402

from pykata import allocator  # noqa: E402
from pykata.api import agent_pb2  # noqa: E402
from pykata.api import extensions_pb2 as ext  # noqa: E402
from pykata.extensions.client import Extensions  # noqa: E402
from pykata.extensions.forward import forward  # noqa: E402
from pykata.extensions.streamexec import ExecSession  # noqa: E402
from pykata.extensions.transfer import download, upload  # noqa: E402
from pykata.ttrpc import Client, Stub  # noqa: E402

R = agent_pb2
MiB = 1 << 20
FORWARD_BYTES = 256 * MiB
CP_BYTES = 512 * MiB
EXEC_BYTES = 1024 * MiB
SETUP_RUNS = int(os.environ.get("SETUP_RUNS", 300))
EXIT_RUNS = int(os.environ.get("EXIT_RUNS", 300))


class Cpu:
    """CPU seconds the agent and this process used between start() and stop()."""

    def __init__(self, agent_pid: int) -> None:
        self.agent_pid = agent_pid

    def _agent(self) -> float:
        fields = Path(f"/proc/{self.agent_pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        self._began = (self._agent(), time.process_time())

    def stop(self, nbytes: int) -> dict[str, float]:
        agent, client = self._agent() - self._began[0], time.process_time() - self._began[1]
        gib = nbytes / (1 << 30)
        return {"agent_cpu_s_per_gib": agent / gib, "client_cpu_s_per_gib": client / gib}


CPU: Cpu


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summary(values_ms: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(values_ms), "p99_ms": percentile(values_ms, 0.99)}


async def _start(api: Any, rootfs: Path, cid: str, *args: str) -> None:
    await api.CreateContainer(R.CreateContainerRequest(container_id=cid, OCI=spec(rootfs, *args)))
    await api.StartContainer(R.StartContainerRequest(container_id=cid))


async def _listening(extensions: Extensions, port: int) -> None:
    for _ in range(500):
        channel = await extensions.open("PortForward", ext.ForwardMessage)
        channel.send(ext.ForwardMessage(open=ext.ForwardTarget(port=port)))
        first = await channel.recv()
        channel.abort()
        if first is not None and first.opened:
            return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port} in the sandbox")


async def _through_forward(extensions: Extensions, port: int, send: int) -> tuple[int, float]:
    """Bytes received and seconds, for one forwarded connection sending `send` bytes."""
    done: asyncio.Future[tuple[int, float]] = asyncio.get_running_loop().create_future()

    async def carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await forward(extensions, reader, writer, ext.ForwardTarget(port=port))
        writer.close()

    server = await asyncio.start_server(carry, "127.0.0.1", 0)
    local = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", local)
        started = time.perf_counter()

        async def push() -> None:
            block = bytes(MiB)
            for _ in range(send // MiB):
                writer.write(block)
                await writer.drain()
            writer.write_eof()

        # nc ends at the end of its input: half-close only once there is something to send
        pushing = asyncio.ensure_future(push()) if send else None
        received = 0
        while data := await reader.read(MiB):
            received += len(data)
        if pushing is not None:
            await pushing
        else:
            writer.write_eof()
        elapsed = time.perf_counter() - started
        writer.close()
        done.set_result((received, elapsed))
    return await done


async def _port_forward(api: Any, extensions: Extensions, rootfs: Path) -> dict[str, Any]:
    await api.CreateSandbox(R.CreateSandboxRequest(sandbox_id="bench"))
    # dd, not head -c: busybox's head copies byte by byte (about 125 MiB/s here).
    count = FORWARD_BYTES // MiB
    loop = f"while true; do dd if=/dev/zero bs=1M count={count} 2>/dev/null | nc -l -p 9000; done"
    await _start(api, rootfs, "source", "/bin/sh", "-c", loop)
    await _start(
        api, rootfs, "sink", "/bin/sh", "-c", "while true; do nc -l -p 9001 >/dev/null; done"
    )
    await _start(api, rootfs, "web", "/usr/sbin/httpd", "-f", "-p", "8080", "-h", "/")
    for port in (9000, 9001, 8080):
        await _listening(extensions, port)
    await asyncio.sleep(0.2)  # nc listens again after the probes
    CPU.start()
    received, seconds = await _through_forward(extensions, 9000, 0)
    down_cpu = CPU.stop(FORWARD_BYTES)
    assert received == FORWARD_BYTES, received
    down = received / seconds / MiB
    CPU.start()
    _, seconds = await _through_forward(extensions, 9001, FORWARD_BYTES)
    up_cpu = CPU.stop(FORWARD_BYTES)
    up = FORWARD_BYTES / seconds / MiB
    setups = []
    for _ in range(SETUP_RUNS):
        started = time.perf_counter()
        channel = await extensions.open("PortForward", ext.ForwardMessage)
        channel.send(ext.ForwardMessage(open=ext.ForwardTarget(port=8080)))
        first = await channel.recv()
        setups.append((time.perf_counter() - started) * 1e3)
        assert first is not None and first.opened
        channel.abort()
    return {
        "download_mib_s": down,
        "upload_mib_s": up,
        "download_cpu": down_cpu,
        "upload_cpu": up_cpu,
        "bytes": FORWARD_BYTES,
        "setup": summary(setups),
        "setup_runs": SETUP_RUNS,
    }


async def _cp(api: Any, extensions: Extensions, rootfs: Path, tmp: Path) -> dict[str, Any]:
    await _start(api, rootfs, "files", "/bin/sleep", "3600")
    source = tmp / "cp-source"
    block = os.urandom(8 * MiB)
    with source.open("wb") as f:
        for n in range(CP_BYTES // len(block)):
            f.write(n.to_bytes(8, "little") + block[8:])
    where = ext.FileLocation(container_id="files", path="/tmp/cp-bench")
    started = time.perf_counter()
    CPU.start()
    up_digest = await upload(extensions, source, where, resume=False)
    up_cpu = CPU.stop(CP_BYTES)
    up = CP_BYTES / (time.perf_counter() - started) / MiB
    started = time.perf_counter()
    CPU.start()
    down_digest = await download(extensions, where, tmp / "cp-back", resume=False)
    down_cpu = CPU.stop(CP_BYTES)
    down = CP_BYTES / (time.perf_counter() - started) / MiB
    assert up_digest == down_digest
    assert hashlib.sha256((tmp / "cp-back").read_bytes()).digest() == up_digest
    for path in (source, tmp / "cp-back", rootfs / "tmp" / "cp-bench"):
        path.unlink()
    return {
        "upload_mib_s": up,
        "download_mib_s": down,
        "upload_cpu": up_cpu,
        "download_cpu": down_cpu,
        "bytes": CP_BYTES,
    }


async def _exec(api: Any, extensions: Extensions, rootfs: Path) -> dict[str, Any]:
    await _start(api, rootfs, "execs", "/bin/sleep", "3600")
    count = EXEC_BYTES // MiB
    command = process("/bin/sh", "-c", f"dd if=/dev/zero bs=1M count={count} 2>/dev/null")
    started = time.perf_counter()
    CPU.start()
    session = await ExecSession.start(extensions, "execs", command)
    received = 0
    async for _stream, data in session.output():
        received += len(data)
    streamed = received / (time.perf_counter() - started) / MiB
    streamed_cpu = CPU.stop(EXEC_BYTES)
    assert received == EXEC_BYTES and session.exit_status == 0
    started = time.perf_counter()
    await api.ExecProcess(
        R.ExecProcessRequest(container_id="execs", exec_id="loop", process=command)
    )
    request = R.ReadStreamRequest(container_id="execs", exec_id="loop", len=MiB)
    received = 0
    while data := (await api.ReadStdout(request)).data:
        received += len(data)
    polled = received / (time.perf_counter() - started) / MiB
    polled_cpu = CPU.stop(EXEC_BYTES)
    await api.WaitProcess(R.WaitProcessRequest(container_id="execs", exec_id="loop"))
    last_byte_to_status, round_trips = [], []
    for _ in range(EXIT_RUNS):
        started = time.perf_counter()
        session = await ExecSession.start(extensions, "execs", process("/bin/echo", "end"))
        last = started
        async for _stream, _data in session.output():
            last = time.perf_counter()
        now = time.perf_counter()
        last_byte_to_status.append((now - last) * 1e3)
        round_trips.append((now - started) * 1e3)
    return {
        "stdout_mib_s_exec": streamed,
        "stdout_mib_s_readstdout_1m": polled,
        "exec_cpu": streamed_cpu,
        "readstdout_cpu": polled_cpu,
        "bytes": EXEC_BYTES,
        "last_byte_to_exit_status": summary(last_byte_to_status),
        "short_exec_round_trip": summary(round_trips),
        "runs": EXIT_RUNS,
    }


async def _measure(address: str, rootfs: Path, tmp: Path) -> dict[str, Any]:
    async with await Client.connect(address) as client:
        api = Stub(client, R.DESCRIPTOR.services_by_name["AgentService"])
        extensions = Extensions(client)
        only = os.environ.get("BENCH_ONLY", "port_forward,cp,exec").split(",")
        results: dict[str, Any] = {}
        if "port_forward" in only:
            results["port_forward"] = await _port_forward(api, extensions, rootfs)
        if "cp" in only:
            results["cp"] = await _cp(api, extensions, rootfs, tmp)
        if "exec" in only:
            results["exec"] = await _exec(api, extensions, rootfs)
        return results


def measure() -> dict[str, Any]:
    """The measurements, made by a process of their own: its allocator is tuned as
    kata-agent-ctl's is (pykata.allocator), which must not change the other
    benchmarks run by this process."""
    done = subprocess.run([sys.executable, __file__], stdout=subprocess.PIPE, check=True, text=True)
    return dict(json.loads(done.stdout))


def _measure_here() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        rootfs = build_rootfs(tmp / "rootfs")
        (tmp / "cmdline").write_text("")
        env = {
            **os.environ,
            "KATA_AGENT_SERVER_ADDR": f"unix://{tmp}/agent.sock",
            "KATA_AGENT_RUN_DIR": f"{tmp}/run",
            "KATA_AGENT_LOG_LEVEL": os.environ.get("AGENT_LOG_LEVEL", "warn"),
        }
        agent = subprocess.Popen(
            [sys.executable, "-m", "pykata.agent.cli", "--kernel-cmdline", f"{tmp}/cmdline"],
            env=env,
            stderr=open(os.environ.get("AGENT_LOG", os.devnull), "w"),  # noqa: SIM115
        )
        try:
            wait_for_socket(f"{tmp}/agent.sock", proc=agent)
            global CPU
            CPU = Cpu(agent.pid)
            if os.environ.get("NO_UVLOOP"):
                return asyncio.run(_measure(f"unix://{tmp}/agent.sock", rootfs, tmp))
            import uvloop

            return uvloop.run(_measure(f"unix://{tmp}/agent.sock", rootfs, tmp))
        finally:
            if agent.poll() is not None:
                print(f"the agent exited with {agent.returncode}", file=sys.stderr)
            agent.terminate()
            agent.wait(30)


if __name__ == "__main__":
    allocator.keep_large_buffers()  # as kata-agent-ctl does
    print(json.dumps(_measure_here(), indent=1))
