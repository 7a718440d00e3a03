"""Process output through the agent, the way the Kata shim reads it.

    python bench/streams.py            # prints JSON results

- end of stream: for short execs, how long after the exit (the agent's
  WaitProcess answer) and after the last byte the reader gets its empty
  answer. Upstream's agent waits up to 500 ms after an exit and can lose
  output (DRAIN_DEADLINE_MS); ours ends the stream at the pipe's end of file.
- no loss: many short execs, each output compared byte for byte.
- throughput: 256 MiB of stdout read with 32 KiB calls (the shim's buffer)
  and with 1 MiB calls.
"""

from __future__ import annotations

import asyncio
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
sys.path.insert(0, str(ROOT / "bench"))

from tests.containers import build_rootfs, spec  # noqa: E402
from tests.peers import wait_for_socket  # noqa: E402

import containers as containers_bench  # noqa: E402
from pykata.api import agent_pb2, oci_pb2  # noqa: E402
from pykata.ttrpc import Client, Stub  # noqa: E402

EOF_RUNS = int(os.environ.get("EOF_RUNS", 1000))
LOSSLESS_EXECS = int(os.environ.get("LOSSLESS_EXECS", 10_000))
STDOUT_BYTES = 256 << 20
SHIM_READ = 32 << 10
R = agent_pb2


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summary(values_ms: list[float]) -> dict[str, float]:
    return {
        "median_ms": statistics.median(values_ms),
        "p99_ms": percentile(values_ms, 0.99),
        "max_ms": max(values_ms),
    }


async def _read_to_end(api: Any, cid: str, exec_id: str, size: int) -> tuple[bytes, float, float]:
    """The output, when the last data arrived, and when the end of stream did."""
    chunks, last = [], time.perf_counter()
    request = R.ReadStreamRequest(container_id=cid, exec_id=exec_id, len=size)
    while data := (await api.ReadStdout(request)).data:
        chunks.append(data)
        last = time.perf_counter()
    return b"".join(chunks), last, time.perf_counter()


def _process(script: str) -> oci_pb2.Process:
    return oci_pb2.Process(Args=["/bin/sh", "-c", script], Cwd="/")


async def _end_of_stream(api: Any) -> dict[str, Any]:
    after_exit, after_last_byte = [], []
    for n in range(EOF_RUNS):
        exec_id = f"eof{n}"
        await api.ExecProcess(
            R.ExecProcessRequest(container_id="host", exec_id=exec_id, process=_process("echo end"))
        )

        async def waited(exec_id: str = exec_id) -> float:
            await api.WaitProcess(R.WaitProcessRequest(container_id="host", exec_id=exec_id))
            return time.perf_counter()

        (out, last, eof), exited = await asyncio.gather(
            _read_to_end(api, "host", exec_id, SHIM_READ), waited()
        )
        assert out == b"end\n", out
        # Negative: the end of stream came before the exit was even reported.
        after_exit.append((eof - exited) * 1e3)
        after_last_byte.append((eof - last) * 1e3)
    return {
        "runs": EOF_RUNS,
        "exit_to_eof": summary(after_exit),
        "last_byte_to_eof": summary(after_last_byte),
    }


async def _lossless(api: Any) -> dict[str, Any]:
    lost = mismatched = 0
    started = time.perf_counter()
    for n in range(LOSSLESS_EXECS):
        exec_id = f"ll{n}"
        expected = f"begin {n}\n{'.' * 1000}\nend {n}\n".encode()
        script = f"echo begin {n}; printf '%1000s\\n' '' | tr ' ' .; echo end {n}"
        await api.ExecProcess(
            R.ExecProcessRequest(container_id="host", exec_id=exec_id, process=_process(script))
        )
        out, _, _ = await _read_to_end(api, "host", exec_id, SHIM_READ)
        await api.WaitProcess(R.WaitProcessRequest(container_id="host", exec_id=exec_id))
        if out != expected:
            mismatched += 1
            lost += max(0, len(expected) - len(out))
    return {
        "execs": LOSSLESS_EXECS,
        "mismatched": mismatched,
        "bytes_lost": lost,
        "seconds": time.perf_counter() - started,
    }


async def _throughput(api: Any, rootfs: Path, size: int) -> float:
    cid = f"out{size}"
    await api.CreateContainer(
        R.CreateContainerRequest(
            container_id=cid,
            OCI=spec(rootfs, "/bin/sh", "-c", containers_bench.PRODUCER),
        )
    )
    await api.StartContainer(R.StartContainerRequest(container_id=cid))
    started = time.perf_counter()
    out, _, _ = await _read_to_end(api, cid, "", size)
    elapsed = time.perf_counter() - started
    assert len(out) == STDOUT_BYTES, len(out)
    await api.RemoveContainer(R.RemoveContainerRequest(container_id=cid))
    return STDOUT_BYTES / elapsed / (1 << 20)


async def _measure(address: str, rootfs: Path) -> dict[str, Any]:
    async with await Client.connect(address) as client:
        api = Stub(client, R.DESCRIPTOR.services_by_name["AgentService"])
        await api.CreateContainer(
            R.CreateContainerRequest(container_id="host", OCI=spec(rootfs, "/bin/sleep", "3600"))
        )
        await api.StartContainer(R.StartContainerRequest(container_id="host"))
        end_of_stream = await _end_of_stream(api)
        lossless = await _lossless(api)
        await api.RemoveContainer(R.RemoveContainerRequest(container_id="host"))
        return {
            "end_of_stream": end_of_stream,
            "lossless": lossless,
            "stdout_mib_s_32k": await _throughput(api, rootfs, SHIM_READ),
            "stdout_mib_s_1m": await _throughput(api, rootfs, 1 << 20),
        }


def measure() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        rootfs = build_rootfs(Path(tmp) / "rootfs")
        (Path(tmp) / "cmdline").write_text("")
        env = {
            **os.environ,
            "KATA_AGENT_SERVER_ADDR": f"unix://{tmp}/agent.sock",
            "KATA_AGENT_RUN_DIR": f"{tmp}/run",
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

            return uvloop.run(_measure(f"unix://{tmp}/agent.sock", rootfs))
        finally:
            agent.terminate()
            agent.wait(30)


if __name__ == "__main__":
    print(json.dumps(measure(), indent=1))
