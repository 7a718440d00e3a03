"""Tracing end to end: agent -> kata-trace-forwarder -> a real OTLP receiver (or a file)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pykata.api import agent_pb2, health_pb2
from pykata.otlp import encode_record
from pykata.ttrpc import Client, Stub, TtrpcError

from .conftest import run_container_agent
from .containers import spec
from .otlp_rules import json_spans, read_otlp_json
from .peers import wait_for_socket
from .receivers import FORWARDER, GrpcReceiver, HttpReceiver, forwarder

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN}-01"


def some_spans(count: int = 3) -> bytes:
    """A record as the agent writes it, made with the OpenTelemetry SDK."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("test")
    for n in range(count):
        with tracer.start_as_current_span(f"span-{n}"):
            pass
    return encode_record(encode_spans(memory.get_finished_spans()).SerializeToString())


def send(path: str, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.sendall(data)


@pytest.mark.parametrize("receiver_type", [GrpcReceiver, HttpReceiver])
def test_forwarder_delivers_to_a_collector(tmp_path: Path, receiver_type: Any) -> None:
    with (
        receiver_type() as receiver,
        forwarder(
            f"unix://{tmp_path}/f.sock",
            "--otlp-endpoint",
            receiver.endpoint,
            "--otlp-protocol",
            "grpc" if receiver_type is GrpcReceiver else "http",
        ),
    ):
        send(f"{tmp_path}/f.sock", some_spans(3))
        spans = receiver.received.wait_for(3)
    assert [s.name for s in spans] == ["span-0", "span-1", "span-2"]
    resource = receiver.received.requests[0].resource_spans[0].resource
    assert {a.key: a.value.string_value for a in resource.attributes}[
        "service.name"
    ] == "kata-agent"


def test_collector_down_at_start_still_gets_the_spans(tmp_path: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with forwarder(
        f"unix://{tmp_path}/f.sock", "--otlp-endpoint", f"http://127.0.0.1:{port}"
    ) as proc:
        send(f"{tmp_path}/f.sock", some_spans(2))
        time.sleep(1.0)  # a few failed attempts
        with GrpcReceiver(port) as receiver:
            spans = receiver.received.wait_for(2)
    assert len(spans) == 2
    assert proc.stderr is not None
    log = proc.stderr.read()
    assert "retrying" in log and "UNAVAILABLE" in log


def test_dump_only_prints_spans(tmp_path: Path) -> None:
    with forwarder(f"unix://{tmp_path}/f.sock", "--dump-only") as proc:
        send(f"{tmp_path}/f.sock", some_spans(1))
        time.sleep(0.5)
    assert proc.stdout is not None and "span 'span-0'" in proc.stdout.read()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_forwarder_started_as_root_runs_as_nobody(tmp_path: Path) -> None:
    with forwarder(f"unix://{tmp_path}/f.sock", "--dump-only") as proc:
        time.sleep(0.3)
        status = Path(f"/proc/{proc.pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    import pwd

    assert uid_line.split()[1:] == [str(pwd.getpwnam("nobody").pw_uid)] * 4


def read_file_spans(path: Path) -> list[dict[str, Any]]:
    """The spans of a --output file, read by the OTLP/JSON reference reader."""
    spans = []
    for resource, s in json_spans(read_otlp_json(path)):
        spans.append(
            {
                "name": s.name,
                "service": resource.get("service.name"),
                "trace": (s.trace_id or b"").hex(),
                "id": (s.span_id or b"").hex(),
                "parent": (s.parent_span_id or b"").hex(),
                "kind": int(s.kind or 0),
                "attrs": {a.key: a.value.string_value for a in s.attributes or []},
                "error": s.status.message if s.status and s.status.code == 2 else None,
            }
        )
    return spans


async def test_agent_spans_end_to_end(tmp_path: Path, rootfs: Path) -> None:
    out = tmp_path / "spans.jsonl"
    with forwarder(f"unix://{tmp_path}/fwd.sock", "--output", str(out)):
        env = {"KATA_AGENT_TRACING": "true", "KATA_AGENT_TRACE_ADDR": f"unix://{tmp_path}/fwd.sock"}
        with run_container_agent(tmp_path, env=env) as agent:
            async with await Client.connect(agent.address) as client:
                api = Stub(client, agent_pb2.DESCRIPTOR.services_by_name["AgentService"])
                meta = {"traceparent": TRACEPARENT}
                await client.call(
                    "grpc.Health",
                    "Check",
                    health_pb2.CheckRequest(),
                    health_pb2.HealthCheckResponse,
                    metadata=meta,
                )
                await api.CreateSandbox(
                    agent_pb2.CreateSandboxRequest(
                        sandbox_id=f"traced-{os.getpid()}",
                        storages=[
                            agent_pb2.Storage(
                                driver="ephemeral",
                                source="tmpfs",
                                mount_point=f"{tmp_path}/run/sandbox/scratch",
                            )
                        ],
                    ),
                    metadata=meta,
                )
                await api.CreateContainer(
                    agent_pb2.CreateContainerRequest(
                        container_id="t1", OCI=spec(rootfs, "/bin/true")
                    ),
                    metadata=meta,
                )
                await api.StartContainer(
                    agent_pb2.StartContainerRequest(container_id="t1"), metadata=meta
                )
                await api.WaitProcess(agent_pb2.WaitProcessRequest(container_id="t1"))
                await api.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id="t1"))
                await api.CreateContainer(
                    agent_pb2.CreateContainerRequest(
                        container_id="t2", OCI=spec(rootfs, "/bin/sleep", "30")
                    ),
                    metadata=meta,
                )
                await api.StartContainer(
                    agent_pb2.StartContainerRequest(container_id="t2"), metadata=meta
                )
                # removing a running container: its processes are killed first
                await api.RemoveContainer(
                    agent_pb2.RemoveContainerRequest(container_id="t2"), metadata=meta
                )
                with pytest.raises(TtrpcError):
                    await api.PauseContainer(
                        agent_pb2.PauseContainerRequest(container_id="absent"), metadata=meta
                    )
            assert agent.stop() == 0
    spans = read_file_spans(out)
    by_name = {s["name"]: s for s in spans if s["attrs"].get("container_id") != "t2"}
    for rpc in ("Check", "CreateSandbox", "CreateContainer", "StartContainer"):
        assert by_name[rpc]["trace"] == TRACE_ID and by_name[rpc]["parent"] == PARENT_SPAN, rpc
        assert by_name[rpc]["kind"] == 2  # SERVER
    assert by_name["CreateContainer"]["attrs"]["container_id"] == "t1"
    assert by_name["CreateSandbox"]["attrs"]["sandbox_id"] == f"traced-{os.getpid()}"
    create = by_name["runtime create"]
    assert create["parent"] == by_name["CreateContainer"]["id"]
    assert by_name["runtime start"]["parent"] == by_name["StartContainer"]["id"]
    assert by_name["storage mount"]["parent"] == by_name["CreateSandbox"]["id"]
    assert by_name["StartContainer"]["error"] is None
    # a failed RPC: its span says so, with the error the caller got
    assert "absent" in by_name["PauseContainer"]["error"]
    assert by_name["PauseContainer"]["attrs"]["container_id"] == "absent"
    # the runtime's steps name the container they act on (not their last argument)
    (remove,) = [
        s
        for s in spans
        if s["attrs"].get("container_id") == "t2" and s["name"] == "RemoveContainer"
    ]
    deletes = {s["attrs"]["container_id"]: s for s in spans if s["name"] == "runtime delete"}
    assert deletes["t2"]["parent"] == remove["id"]
    # no traceparent: a child of the agent's root span, which arrives at shutdown
    root = by_name["kata-agent"]
    assert root["parent"] == ""
    assert by_name["WaitProcess"]["parent"] == root["id"]


async def calls(client: Client, method: str, count: int) -> None:
    """`count` Health calls (Check or Version), one after another."""
    reply = {"Check": health_pb2.HealthCheckResponse, "Version": health_pb2.VersionCheckResponse}
    for _ in range(count):
        await client.call("grpc.Health", method, health_pb2.CheckRequest(), reply[method])


async def test_agent_keeps_spans_while_the_forwarder_is_away(tmp_path: Path) -> None:
    out = tmp_path / "spans.jsonl"
    address = f"unix://{tmp_path}/fwd.sock"
    env = {"KATA_AGENT_TRACING": "true", "KATA_AGENT_TRACE_ADDR": address}
    with run_container_agent(tmp_path, env=env) as agent:
        async with await Client.connect(agent.address) as client:
            await calls(client, "Check", 5)  # no forwarder yet
            time.sleep(0.6)  # past the exporter's 200 ms schedule: it tries, and finds none
            with forwarder(address, "--output", str(out)):
                await calls(client, "Version", 5)
                time.sleep(1.0)
            # the forwarder restarts; spans made meanwhile wait in the agent
            await calls(client, "Check", 3)
            with forwarder(address, "--output", str(out)):
                assert agent.stop() == 0
    names = [s["name"] for s in read_file_spans(out)]
    assert names.count("Check") == 8 and names.count("Version") == 5
    assert "kata-agent" in names
    logs = agent.log_lines()
    absent = sum("trace forwarder unreachable" in str(line["msg"]) for line in logs)
    assert 1 <= absent <= 2  # once while it is away (not once per batch)


def test_trace_view_waterfall_and_chrome(tmp_path: Path) -> None:
    out = tmp_path / "spans.jsonl"
    with forwarder(f"unix://{tmp_path}/f.sock", "--output", str(out)):
        send(f"{tmp_path}/f.sock", some_spans(3))
        time.sleep(0.5)
    view = subprocess.run(
        [sys.executable, "-m", "pykata.traceview", str(out)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert view.returncode == 0 and "span-2" in view.stdout and "█" in view.stdout
    chrome = subprocess.run(
        [sys.executable, "-m", "pykata.traceview", str(out), "--chrome", str(tmp_path / "c.json")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert chrome.returncode == 0
    events = json.loads((tmp_path / "c.json").read_text())["traceEvents"]
    events = [e for e in events if e["ph"] != "M"]  # the tracks' names
    assert [e["name"] for e in events] == ["span-0", "span-1", "span-2"]
    assert all(e["ph"] == "X" and e["dur"] >= 0 for e in events)


def test_hybrid_vsock_socket_path_and_trace_name(tmp_path: Path) -> None:
    """--socket-path: the forwarder listens where the VMM delivers guest port 10240."""
    out = tmp_path / "spans.jsonl"
    proc = subprocess.Popen(
        [
            *FORWARDER,
            "--socket-path",
            f"{tmp_path}/clh.sock",
            "--trace-name",
            "my-agent",
            "--output",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_socket(f"{tmp_path}/clh.sock_10240", proc=proc)
        for _ in range(3):  # several agents (VMs) at once
            send(f"{tmp_path}/clh.sock_10240", some_spans(1))
        deadline = time.monotonic() + 30  # readiness by retry: until all three are written
        while time.monotonic() < deadline and len(resources(out)) < 3:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    # one resource per agent's record (the forwarder may join them into one export)
    assert len(resources(out)) == 3
    for resource in resources(out):
        attributes = resource["resource"]["attributes"]
        assert {"key": "service.name", "value": {"stringValue": "my-agent"}} in attributes


def resources(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]  # whole lines: one may be being written
    return [r for line in lines for r in json.loads(line)["resourceSpans"]]


def test_forwarder_listens_on_vsock_by_default(tmp_path: Path) -> None:
    """Bind and listen only: this machine has no vsock peer to send from."""
    port = str(20000 + os.getpid() % 20000)
    proc = subprocess.Popen(
        [*FORWARDER, "--vsock-port", port, "--dump-only"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        while "forwarding" not in (line := proc.stderr.readline()):
            assert line, "the forwarder exited before listening"
        assert f'"listen": "vsock://-1:{port}"' in line
        # the port is taken: a second forwarder says so, in one line
        second = subprocess.run(
            [*FORWARDER, "--vsock-port", port, "--dump-only"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 1
        assert f"cannot listen on vsock://-1:{port}" in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


async def test_huge_ids_are_cut_and_no_other_span_is_lost(tmp_path: Path) -> None:
    """Forty calls with a 1 MiB container_id, among others' calls: every span arrives,
    the ids cut to 4096 characters; the agent counts no span dropped."""
    out = tmp_path / "spans.jsonl"
    address = f"unix://{tmp_path}/fwd.sock"
    env = {"KATA_AGENT_TRACING": "true", "KATA_AGENT_TRACE_ADDR": address}
    huge = "c" * (1 << 20)
    with forwarder(address, "--output", str(out)), run_container_agent(tmp_path, env=env) as agent:
        async with await Client.connect(agent.address) as client:
            api = Stub(client, agent_pb2.DESCRIPTOR.services_by_name["AgentService"])

            async def pause() -> None:
                with pytest.raises(TtrpcError):
                    await api.PauseContainer(agent_pb2.PauseContainerRequest(container_id=huge))

            await asyncio.gather(*[pause() for _ in range(40)], calls(client, "Check", 40))
            time.sleep(0.5)  # an export interval or two
            metrics = await api.GetMetrics(agent_pb2.GetMetricsRequest())
        assert agent.stop() == 0
    spans = read_file_spans(out)
    paused = [s for s in spans if s["name"] == "PauseContainer"]
    assert len(paused) == 40
    assert all(s["attrs"]["container_id"] == "c" * 4096 for s in paused)
    assert len([s for s in spans if s["name"] == "Check"]) == 40
    assert "kata_agent_trace_spans_dropped_total 0.0" in metrics.metrics
    exported = re.search(r"^kata_agent_trace_spans_exported_total (\S+)$", metrics.metrics, re.M)
    assert exported is not None and float(exported.group(1)) >= 80
    assert not [line for line in agent.log_lines() if "dropped" in str(line["msg"])]


class SilentForwarder:
    """Accepts every connection and never reads from any (the hostile forwarder)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(64)
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.held.append(self.sock.accept()[0])

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


async def test_shutdown_is_bounded_when_the_forwarder_never_reads(tmp_path: Path) -> None:
    silent = SilentForwarder(f"{tmp_path}/fwd.sock")
    env = {"KATA_AGENT_TRACING": "true", "KATA_AGENT_TRACE_ADDR": f"unix://{tmp_path}/fwd.sock"}
    try:
        with run_container_agent(tmp_path, env=env) as agent:
            async with await Client.connect(agent.address) as client:
                api = Stub(client, agent_pb2.DESCRIPTOR.services_by_name["AgentService"])
                for n in range(400):  # ~1.7 MB of spans: more than the socket buffers take
                    with pytest.raises(TtrpcError):
                        await api.PauseContainer(
                            agent_pb2.PauseContainerRequest(container_id=f"{n}" * 4096)
                        )
            assert agent.stop(timeout=30) == 0
    finally:
        silent.close()
    lost = [line for line in agent.log_lines() if "did not take" in str(line["msg"])]
    assert len(lost) == 1, agent.log_lines()[-5:]
    assert re.search(r"did not take \d+ span\(s\) before shutdown", str(lost[0]["msg"]))
    assert len(silent.held) >= 1


def test_dropped_spans_are_counted_logged_and_in_the_metrics(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the forwarder away and the buffer full, the oldest spans go: every one counted."""
    from pykata.agent import tracing
    from pykata.agent.metrics import Metrics
    from pykata.agent.traceprovider import TraceProvider
    from pykata.spans import Limits

    limits = Limits(max_buffered_bytes=20_000, interval=0.05)
    traced = TraceProvider(f"unix://{tmp_path}/absent.sock", limits)
    try:
        for n in range(100):
            with tracing.step("runtime state", {"container_id": f"{n:0200d}"}):
                pass
        # Until the export thread has encoded them all and found the buffer full.
        exporter, deadline = traced.exporter, time.monotonic() + 30
        while exporter._ended or not exporter.dropped_spans:
            assert time.monotonic() < deadline, "the export thread never took the spans"
            time.sleep(0.01)
        dropped = exporter.dropped_spans
        text = Metrics().text()
    finally:
        traced.stop(timeout=0.5)
    assert 0 < dropped < 100
    assert f"kata_agent_trace_spans_dropped_total {float(dropped)}" in text
    logged = [r.getMessage() for r in caplog.records if "span buffer full" in r.getMessage()]
    assert logged and logged[0].startswith("span buffer full: dropped")
    # at shutdown the rest is lost too, and said so
    assert traced.exporter.dropped_spans == 101  # and the root span


def test_ctl_trace_is_one_tree_from_the_command_line_to_the_runtime(
    tmp_path: Path, rootfs: Path
) -> None:
    out = tmp_path / "spans.jsonl"
    address = f"unix://{tmp_path}/fwd.sock"
    env = {"KATA_AGENT_TRACING": "true", "KATA_AGENT_TRACE_ADDR": address}
    with forwarder(address, "--output", str(out)), run_container_agent(tmp_path, env=env) as agent:
        ctl = subprocess.run(
            [
                sys.executable,
                "-m",
                "pykata.ctl.cli",
                "connect",
                "--server-address",
                agent.address,
                "--trace",
                address,
                "--bundle-dir",
                str(rootfs),
                "-c",
                "Check",
                "-c",
                "run /bin/echo traced",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ctl.returncode == 0, ctl.stderr
        assert "traced" in ctl.stdout
        assert agent.stop() == 0
    spans = read_file_spans(out)
    (run,) = [s for s in spans if s["name"] == "kata-agent-ctl"]
    members = [s for s in spans if s["trace"] == run["trace"]]
    by_id = {s["id"]: s for s in members}
    assert [s for s in members if s["parent"] not in by_id] == [run]  # one tree
    assert {s["service"] for s in members} == {"kata-agent-ctl", "kata-agent"}

    def chain(span: dict[str, Any]) -> list[str]:
        names = []
        node: dict[str, Any] | None = span
        while node is not None:
            names.append(node["name"])
            node = by_id.get(node["parent"])
        return names

    (create,) = [s for s in members if s["name"] == "runtime create"]
    assert chain(create) == [
        "runtime create",
        "CreateContainer",
        "grpc.AgentService/CreateContainer",
        "run",
        "kata-agent-ctl",
    ]
    (check,) = [s for s in members if s["name"] == "Check" and s["service"] == "kata-agent"]
    assert chain(check) == ["Check", "grpc.Health/Check", "Check", "kata-agent-ctl"]
    # kata-trace-view shows it whole: one trace, the services where they change
    view = subprocess.run(
        [sys.executable, "-m", "pykata.traceview", str(out)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    block = view.stdout.split(f"trace {run['trace']}")[1].split("\ntrace ")[0]
    assert f"{len(members)} span(s)" in block.splitlines()[0]
    assert "[kata-agent-ctl] kata-agent-ctl" in block
    assert "[kata-agent] CreateContainer" in block and "runtime create" in block
