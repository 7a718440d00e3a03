"""Tracing benchmarks: spans/s through kata-trace-forwarder into a gRPC receiver,
and the agent's RPC latency with tracing on and off.

    python bench/tracing.py      # prints JSON results
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.containers import build_rootfs  # noqa: E402
from tests.peers import wait_for_socket  # noqa: E402
from tests.receivers import GrpcReceiver  # noqa: E402

from pykata.api.health_pb2 import CheckRequest, HealthCheckResponse  # noqa: E402
from pykata.otlp import encode_record  # noqa: E402
from pykata.ttrpc import Client  # noqa: E402

SPANS = 100_000
BATCH = 512  # the agent's export batch size
CALLS = 5000
CYCLES = 30
ROUNDS = 5


def span_records(count: int) -> list[bytes]:
    """Records as the agent writes them: SDK spans, OTLP-encoded, BATCH per record."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("bench")
    for n in range(BATCH):
        with tracer.start_as_current_span("StartContainer", attributes={"container_id": f"c{n}"}):
            pass
    record = encode_record(encode_spans(memory.get_finished_spans()).SerializeToString())
    return [record] * (count // BATCH)


def forwarder_rate(tmp: str) -> float:
    records = span_records(SPANS)
    total = len(records) * BATCH
    with GrpcReceiver() as receiver:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pykata.forwarder.cli",
                "--listen",
                f"unix://{tmp}/f.sock",
                "--otlp-endpoint",
                receiver.endpoint,
                "-l",
                "warn",
                "--queue-size",
                "100000",
            ]
        )
        try:
            wait_for_socket(f"{tmp}/f.sock", proc=proc)
            started = time.perf_counter()
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(f"{tmp}/f.sock")
                for record in records:
                    sock.sendall(record)
            receiver.received.wait_for(total, timeout=120)
            elapsed = time.perf_counter() - started
            got = len(receiver.received.spans())
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    assert got == total, (got, total)
    return total / elapsed


async def check_latencies(
    address: str, calls: int, metadata: dict[str, str] | None = None
) -> list[float]:
    """Seconds per sequential Health/Check, one connection."""
    async with await Client.connect(address) as client:
        samples = []
        for _ in range(calls):
            started = time.perf_counter()
            await client.call(
                "grpc.Health", "Check", CheckRequest(), HealthCheckResponse, metadata=metadata
            )
            samples.append(time.perf_counter() - started)
    return samples


async def _latency(address: str) -> float:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    samples = await check_latencies(address, CALLS, {"traceparent": traceparent})
    return statistics.median(samples) * 1e6


async def _container_cycle(address: str, rootfs: Path) -> float:
    """Median create/start/wait/remove of a /bin/true container in ms (RPCs carry a traceparent)."""
    from bench.containers import config

    from pykata.agent import oci
    from pykata.api import agent_pb2, oci_pb2
    from pykata.ttrpc import Stub

    meta = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    spec = oci_pb2.Spec()
    oci.from_json(config(rootfs, "/bin/true"), spec)
    async with await Client.connect(address) as client:
        api = Stub(client, agent_pb2.DESCRIPTOR.services_by_name["AgentService"])
        samples = []
        for n in range(CYCLES):
            cid = f"c{n}"
            started = time.perf_counter()
            await api.CreateContainer(
                agent_pb2.CreateContainerRequest(container_id=cid, OCI=spec), metadata=meta
            )
            await api.StartContainer(
                agent_pb2.StartContainerRequest(container_id=cid), metadata=meta
            )
            await api.WaitProcess(agent_pb2.WaitProcessRequest(container_id=cid), metadata=meta)
            await api.RemoveContainer(
                agent_pb2.RemoveContainerRequest(container_id=cid), metadata=meta
            )
            samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e3


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: The agent's CPU per Check call, in us, by traced (filled by agent_latency).
cpu_per_call: dict[bool, list[float]] = {False: [], True: []}


def agent_latency(tmp: str, traced: bool, rootfs: Path | None = None) -> float:
    """Median Check round trip in us; with `rootfs`, the median container cycle in ms."""
    (Path(tmp) / "cmdline").write_text("")
    env = {
        **os.environ,
        "KATA_AGENT_SERVER_ADDR": f"unix://{tmp}/agent.sock",
        "KATA_AGENT_RUN_DIR": f"{tmp}/run",
        "KATA_AGENT_LOG_LEVEL": "warn",
        "KATA_AGENT_TRACING": "true" if traced else "false",
        "KATA_AGENT_TRACE_ADDR": f"unix://{tmp}/t.sock",
    }
    fwd = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pykata.forwarder.cli",
            "--listen",
            f"unix://{tmp}/t.sock",
            "--output",
            "/dev/null",
            "-l",
            "warn",
        ]
    )
    wait_for_socket(f"{tmp}/t.sock", proc=fwd)
    agent = subprocess.Popen(
        [sys.executable, "-m", "pykata.agent.cli", "--kernel-cmdline", f"{tmp}/cmdline"], env=env
    )
    try:
        wait_for_socket(f"{tmp}/agent.sock", proc=agent)
        import uvloop

        address = f"unix://{tmp}/agent.sock"
        if rootfs is not None:
            return float(uvloop.run(_container_cycle(address, rootfs)))
        before = cpu_seconds(agent.pid)
        latency = float(uvloop.run(_latency(address)))
        cpu_per_call[traced].append((cpu_seconds(agent.pid) - before) / CALLS * 1e6)
        return latency
    finally:
        for proc in (agent, fwd):
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def measure() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        rate = forwarder_rate(tmp)
        # alternate off/on so that a slow spell of the machine hits both alike
        runs: dict[bool, list[float]] = {False: [], True: []}
        cycles: dict[bool, list[float]] = {False: [], True: []}
        rootfs = build_rootfs(Path(tmp) / "rootfs")
        for _ in range(ROUNDS):
            for traced in (False, True):
                runs[traced].append(agent_latency(tmp, traced))
                cycles[traced].append(agent_latency(tmp, traced, rootfs))
    return {
        "forwarder_spans_per_s": rate,
        "check_us_off": statistics.median(runs[False]),
        "check_us_on": statistics.median(runs[True]),
        "check_ratio_per_round": [
            on / off for off, on in zip(runs[False], runs[True], strict=True)
        ],
        "check_cpu_us_off": statistics.median(cpu_per_call[False]),
        "check_cpu_us_on": statistics.median(cpu_per_call[True]),
        "cycle_ratio_per_round": [
            on / off for off, on in zip(cycles[False], cycles[True], strict=True)
        ],
        "cycle_ms_off": statistics.median(cycles[False]),
        "cycle_ms_on": statistics.median(cycles[True]),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(asyncio.to_thread(measure)), indent=1))
