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

from tests.peers import wait_for_socket  # noqa: E402
from tests.receivers import GrpcReceiver  # noqa: E402

from pykata.api.health_pb2 import CheckRequest, HealthCheckResponse  # noqa: E402
from pykata.otlp import encode_record  # noqa: E402
from pykata.ttrpc import Client  # noqa: E402

SPANS = 100_000
BATCH = 512  # the agent's export batch size
CALLS = 3000


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


async def _latency(address: str) -> float:
    async with await Client.connect(address) as client:
        samples = []
        for _ in range(CALLS):
            started = time.perf_counter()
            await client.call(
                "grpc.Health",
                "Check",
                CheckRequest(),
                HealthCheckResponse,
                metadata={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
            )
            samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6


def agent_latency(tmp: str, traced: bool) -> float:
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

        return float(uvloop.run(_latency(f"unix://{tmp}/agent.sock")))
    finally:
        for proc in (agent, fwd):
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def measure() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        rate = forwarder_rate(tmp)
        off = [agent_latency(tmp, False) for _ in range(2)]
        on = [agent_latency(tmp, True) for _ in range(2)]
    return {
        "forwarder_spans_per_s": rate,
        "check_us_off": statistics.median(off),
        "check_us_on": statistics.median(on),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(asyncio.to_thread(measure)), indent=1))
