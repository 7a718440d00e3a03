"""Tracing benchmarks: spans/s through kata-trace-forwarder into a gRPC receiver (our
agent's records, and upstream's Rust agent's), and the agent's RPC latency and CPU
with tracing on and off.

    python bench/tracing.py      # prints JSON results
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.containers import build_rootfs  # noqa: E402
from tests.peers import wait_for_socket  # noqa: E402
from tests.receivers import GrpcReceiver  # noqa: E402
from tests.upstream_spans import UpstreamSpan  # noqa: E402

from pykata import otlp  # noqa: E402
from pykata.api.health_pb2 import CheckRequest, HealthCheckResponse  # noqa: E402
from pykata.ttrpc import Client  # noqa: E402

SPANS = 100_000
BATCH = 512  # spans per record in this benchmark (the agent packs up to 1 MiB)
UPSTREAM_SPANS = 20_000  # upstream's agent sends one span per record
CALLS = 5000
CYCLES = 30
ROUNDS = 5


def span_records(count: int) -> list[bytes]:
    """Records as our agent writes them: RPC spans, OTLP-encoded, BATCH per record."""
    spans = [
        otlp.encode_span(
            trace_id=n.to_bytes(16, "big"),
            span_id=(n + 1).to_bytes(8, "big"),
            parent_id=b"parent!!",
            name="StartContainer",
            kind=otlp.SERVER,
            start=1_700_000_000_000_000_000 + n,
            end=1_700_000_000_000_100_000 + n,
            attributes={
                "rpc.system": "ttrpc",
                "rpc.service": "grpc.AgentService",
                "rpc.method": "StartContainer",
                "container_id": f"{n:064x}",
            },
            flags=0x301,
        )
        for n in range(BATCH)
    ]
    resource, scope = otlp.encode_resource_scope({"service.name": "kata-agent"}, "pykata.agent")
    record = otlp.encode_record(otlp.encode_request(resource, scope, spans))
    return [record] * (count // BATCH)


def upstream_records(count: int) -> list[bytes]:
    """Records as upstream's Rust agent writes them: one JSON SpanData each, with the
    attributes tracing-opentelemetry gives an RPC span."""
    records = []
    for n in range(count):
        span = UpstreamSpan(
            name="start_container",
            trace_id=(n + 1) << 64 | n,
            span_id=n + 1,
            parent_id=0xB7AD6B7169203331,
            kind="Server",
            attributes={
                "mod": "rpc.rs",
                "req": f'StartContainerRequest {{ container_id: "{n:064x}", '
                "special_fields: SpecialFields { unknown_fields: UnknownFields { fields: "
                "None }, cached_size: CachedSize { size: 0 } } }",
                "code.filepath": "src/rpc.rs",
                "code.namespace": "kata_agent::rpc",
                "code.lineno": 960,
                "busy_ns": 250_000 + n,
                "idle_ns": 1_500,
            },
        )
        records.append(span.record())
    return records


def forwarder_rate(tmp: str, records: list[bytes], total: int) -> float:
    """Spans/s from one connection through kata-trace-forwarder into a gRPC receiver."""
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
                "--queue-bytes",
                "512M",
            ]
        )
        try:
            wait_for_socket(f"{tmp}/f.sock", proc=proc)
            started = time.perf_counter()
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(f"{tmp}/f.sock")
                for record in records:
                    sock.sendall(record)
            receiver.received.wait_for(total, timeout=300)
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


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def _interleaved(addresses: dict[bool, str], pids: dict[bool, int]) -> dict[str, Any]:
    """Checks to the untraced and the traced agent in turn, CALLS each: both see the same
    machine. Per agent: median round trip (us) and CPU per call (us, from /proc)."""
    meta = {"traceparent": TRACEPARENT}
    clients = {traced: await Client.connect(address) for traced, address in addresses.items()}
    samples: dict[bool, list[float]] = {False: [], True: []}
    try:
        for traced in (False, True):  # warm up both
            await clients[traced].call(
                "grpc.Health", "Check", CheckRequest(), HealthCheckResponse, metadata=meta
            )
        before = {traced: cpu_seconds(pid) for traced, pid in pids.items()}
        for _ in range(CALLS):
            for traced in (False, True):
                started = time.perf_counter()
                await clients[traced].call(
                    "grpc.Health", "Check", CheckRequest(), HealthCheckResponse, metadata=meta
                )
                samples[traced].append(time.perf_counter() - started)
        cpu = {
            traced: (cpu_seconds(pid) - before[traced]) / CALLS * 1e6
            for traced, pid in pids.items()
        }
    finally:
        for client in clients.values():
            await client.close()
    return {
        "latency_us": {traced: statistics.median(v) * 1e6 for traced, v in samples.items()},
        "cpu_us": cpu,
    }


async def _container_cycle(address: str, rootfs: Path) -> float:
    """Median create/start/wait/remove of a /bin/true container in ms (RPCs carry a traceparent)."""
    from bench.containers import config

    from pykata import ocispec
    from pykata.api import agent_pb2, oci_pb2
    from pykata.ttrpc import Stub

    meta = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    spec = oci_pb2.Spec()
    ocispec.from_json(config(rootfs, "/bin/true"), spec)
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


def start_forwarder(tmp: str) -> subprocess.Popen[bytes]:
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
    return fwd


def start_agent(tmp: str, traced: bool) -> tuple[subprocess.Popen[bytes], str]:
    name = "on" if traced else "off"
    (Path(tmp) / "cmdline").write_text("")
    env = {
        **os.environ,
        "KATA_AGENT_SERVER_ADDR": f"unix://{tmp}/agent-{name}.sock",
        "KATA_AGENT_RUN_DIR": f"{tmp}/run-{name}",
        "KATA_AGENT_LOG_LEVEL": "warn",
        "KATA_AGENT_TRACING": "true" if traced else "false",
        "KATA_AGENT_TRACE_ADDR": f"unix://{tmp}/t.sock",
    }
    agent = subprocess.Popen(
        [sys.executable, "-m", "pykata.agent.cli", "--kernel-cmdline", f"{tmp}/cmdline"], env=env
    )
    wait_for_socket(f"{tmp}/agent-{name}.sock", proc=agent)
    return agent, f"unix://{tmp}/agent-{name}.sock"


def stop(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


class SpanSink:
    """Takes the traced agent's records and discards them: the forwarder's own work
    (parsing, the collector) would compete with the agents for this machine's CPUs."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(4)
        self.bytes = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn = self.sock.accept()[0]
                threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        with conn:
            while chunk := conn.recv(1 << 16):
                self.bytes += len(chunk)

    def close(self) -> None:
        self.sock.close()


def check_round(tmp: str) -> dict[str, Any]:
    """One round of Checks, untraced and traced agents side by side."""
    import uvloop

    sink = SpanSink(f"{tmp}/t.sock")
    agents = {traced: start_agent(tmp, traced) for traced in (False, True)}
    try:
        addresses = {traced: address for traced, (_, address) in agents.items()}
        pids = {traced: proc.pid for traced, (proc, _) in agents.items()}
        result = dict(uvloop.run(_interleaved(addresses, pids)))
    finally:
        stop(*(proc for proc, _ in agents.values()))
        sink.close()
        os.unlink(f"{tmp}/t.sock")
    assert sink.bytes > CALLS * 50, sink.bytes  # the spans did go out
    return result


def cycle_latency(tmp: str, traced: bool, rootfs: Path) -> float:
    """The median container cycle in ms."""
    import uvloop

    fwd = start_forwarder(tmp)
    agent, address = start_agent(tmp, traced)
    try:
        return float(uvloop.run(_container_cycle(address, rootfs)))
    finally:
        stop(agent, fwd)


def measure() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        rate = forwarder_rate(tmp, span_records(SPANS), SPANS // BATCH * BATCH)
        upstream_rate = forwarder_rate(tmp, upstream_records(UPSTREAM_SPANS), UPSTREAM_SPANS)
        checks = [check_round(tmp) for _ in range(ROUNDS)]
        # alternate off/on so that a slow spell of the machine hits both alike
        cycles: dict[bool, list[float]] = {False: [], True: []}
        rootfs = build_rootfs(Path(tmp) / "rootfs")
        for _ in range(ROUNDS):
            for traced in (False, True):
                cycles[traced].append(cycle_latency(tmp, traced, rootfs))

    def per_round(key: str) -> list[float]:
        return [c[key][True] / c[key][False] for c in checks]

    def median(key: str, traced: bool) -> float:
        return statistics.median(c[key][traced] for c in checks)

    return {
        "forwarder_spans_per_s": rate,
        "forwarder_upstream_spans_per_s": upstream_rate,
        "check_us_off": median("latency_us", False),
        "check_us_on": median("latency_us", True),
        "check_ratio_per_round": per_round("latency_us"),
        "check_cpu_us_off": median("cpu_us", False),
        "check_cpu_us_on": median("cpu_us", True),
        "check_cpu_ratio_per_round": per_round("cpu_us"),
        "cycle_ratio_per_round": [
            on / off for off, on in zip(cycles[False], cycles[True], strict=True)
        ],
        "cycle_ms_off": statistics.median(cycles[False]),
        "cycle_ms_on": statistics.median(cycles[True]),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(asyncio.to_thread(measure)), indent=1))
