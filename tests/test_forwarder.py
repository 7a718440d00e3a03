"""kata-trace-forwarder with upstream's Rust agent's records and ours, into a real OTLP
receiver or a file; its bounds under hostile senders."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from pykata import otlp
from pykata.otlp import HEADER, encode_record

from .otlp_rules import differences, json_spans, read_otlp_json
from .receivers import FORWARDER, GrpcReceiver, HttpReceiver, forwarder
from .upstream_spans import create_container_trace

OURS_TRACE = bytes.fromhex("5b8efff798038103d269b633813fc60c")


def our_record(name: str, count: int = 1, attribute: str = "c1") -> bytes:
    """A record as our agent writes it (pykata.spans' encoder)."""
    spans = [
        otlp.encode_span(
            trace_id=OURS_TRACE,
            span_id=(n + 1).to_bytes(8, "big"),
            parent_id=b"",
            name=f"{name}-{n}",
            kind=otlp.SERVER,
            start=1_000 + n,
            end=2_000 + n,
            attributes={"container_id": attribute},
            flags=1,
        )
        for n in range(count)
    ]
    resource, scope = otlp.encode_resource_scope({"service.name": "kata-agent"}, "pykata.agent")
    return encode_record(otlp.encode_request(resource, scope, spans))


def connected(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    return sock


def send(path: str, data: bytes) -> None:
    with connected(path) as sock:
        sock.sendall(data)


def log_lines(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    """The forwarder's JSON log, once it has exited."""
    assert proc.stderr is not None
    return [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def stopped(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    return log_lines(proc)


@pytest.mark.parametrize("receiver_type", [GrpcReceiver, HttpReceiver])
def test_upstream_agent_spans_reach_a_collector_field_by_field(
    tmp_path: Path, receiver_type: Any
) -> None:
    trace = create_container_trace()
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
        send(f"{tmp_path}/f.sock", b"".join(span.record() for span in trace))
        got = receiver.received.wait_for(len(trace))
    by_name = {span.name: span for span in got}
    assert sorted(by_name) == sorted(s.name for s in trace)
    for expected in trace:
        assert json_format.MessageToDict(by_name[expected.name]) == json_format.MessageToDict(
            expected.otlp()
        )
    # the resource as the agent sent it, named as --trace-name says (upstream's default)
    for request in receiver.received.requests:
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            assert resource == {**trace[0].resource, "service.name": "kata-agent"}  # type: ignore[dict-item]
            assert resource_spans.scope_spans[0].scope.name == ""  # not in upstream's record


def test_mixed_stream_with_garbage_loses_only_the_garbage(tmp_path: Path) -> None:
    upstream_spans = create_container_trace()
    stream = [
        upstream_spans[0].record(),
        our_record("ours", 3),
        encode_record(b"\xff\xfe\xfd\xfc\xfb"),  # a record of neither shape
        upstream_spans[1].record(),
        b"GARBAGE! these bytes are no record at all",
        our_record("more", 2),
        encode_record(b'{"hello": "world"}'),  # JSON, but not a span
        upstream_spans[2].record(),
    ]
    with (
        GrpcReceiver() as receiver,
        forwarder(f"unix://{tmp_path}/f.sock", "--otlp-endpoint", receiver.endpoint) as proc,
    ):
        with connected(f"{tmp_path}/f.sock") as sock:
            for piece in stream:
                sock.sendall(piece)
            got = receiver.received.wait_for(8)
            # the connection is still open and still read
            sock.sendall(our_record("after", 1))
            got = receiver.received.wait_for(9)
        logs = stopped(proc)
    names = sorted(s.name for s in got)
    assert names == sorted(
        [s.name for s in upstream_spans] + ["ours-0", "ours-1", "ours-2", "more-0", "more-1"]
        + ["after-0"]
    )  # fmt: skip
    warnings = [line["msg"] for line in logs if line["level"] == "WARN"]
    assert warnings == [
        "dropping a record of 5 bytes: neither a JSON span nor an OTLP request (corrupt protobuf)",
        "skipping 41 bytes: bytes that are not a record",
        "dropping a record of 18 bytes: not an opentelemetry-rust 0.17 SpanData: "
        "no field 'span_context'",
    ]
    assert logs[-1]["msg"] == "stopped" and logs[-1]["dropped_records"] == 3


def test_output_file_follows_the_otlp_json_rules(tmp_path: Path) -> None:
    out = tmp_path / "spans.jsonl"
    trace = create_container_trace()
    with forwarder(f"unix://{tmp_path}/f.sock", "--output", str(out)):
        send(f"{tmp_path}/f.sock", b"".join(s.record() for s in trace) + our_record("ours", 2))
        deadline = time.monotonic() + 20
        while len(_lines(out)) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    spans = {span.name: (resource, span) for resource, span in json_spans(read_otlp_json(out))}
    assert len(spans) == 5
    for expected in trace:
        resource, read = spans[expected.name]
        assert differences(read, expected.otlp()) == []
        assert resource["service.name"] == "kata-agent"
    resource, read = spans["ours-1"]
    assert read.trace_id == OURS_TRACE and read.span_id == (2).to_bytes(8, "big")
    assert int(read.kind) == otlp.SERVER
    assert read.attributes[0].value.string_value == "c1"


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_trace_view_reads_new_and_old_files(tmp_path: Path) -> None:
    new = tmp_path / "new.jsonl"
    with forwarder(f"unix://{tmp_path}/f.sock", "--output", str(new)):
        send(f"{tmp_path}/f.sock", b"".join(s.record() for s in create_container_trace()))
        time.sleep(0.8)
    from pykata import otlpjson

    # the same requests as older forwarders wrote them: base64 ids, enum names
    old = tmp_path / "old.jsonl"
    old.write_text(
        "".join(
            json.dumps(json_format.MessageToDict(otlpjson.loads(line))) + "\n"
            for line in _lines(new)
        )
    )
    assert '"traceId": "CvdlGRbNQ92ESOshHIAxnA=="' in old.read_text()
    views = []
    for path in (new, old):
        view = subprocess.run(
            [sys.executable, "-m", "pykata.traceview", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert view.returncode == 0, view.stderr
        views.append(view.stdout)
    assert views[0] == views[1]
    lines = views[0].splitlines()
    assert lines[0].startswith("trace 0af7651916cd43dd8448eb211c80319c")
    assert [line.split()[0] for line in lines[1:]] == [
        "create_container",
        "do_create_container",
        "setup_bundle",
    ]
    # nested: each deeper than its parent
    indents = [len(line) - len(line.lstrip()) for line in lines[1:]]
    assert indents == sorted(indents) and len(set(indents)) == 3


# --- bounds -------------------------------------------------------------------------


@contextlib.contextmanager
def running_forwarder(tmp_path: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    with forwarder(f"unix://{tmp_path}/f.sock", *args) as proc:
        yield proc


def test_oversize_records_are_refused_before_buffering(tmp_path: Path) -> None:
    """Eight connections announce 60 MiB records and send 8 MiB of each: nothing is
    buffered (the forwarder stays small), each is refused in one line, and the next
    agent's spans still arrive."""
    with (
        GrpcReceiver() as receiver,
        running_forwarder(tmp_path, "--otlp-endpoint", receiver.endpoint) as proc,
    ):
        baseline = peak_rss_mb(proc.pid)
        chunk = b"{" * (1 << 20)
        hostile = [connected(f"{tmp_path}/f.sock") for _ in range(8)]
        for sock in hostile:
            sock.sendall(HEADER.pack(60 << 20))
        for _ in range(8):
            for sock in hostile:
                sock.sendall(chunk)
        send(f"{tmp_path}/f.sock", our_record("good", 2))
        receiver.received.wait_for(2)
        peak = peak_rss_mb(proc.pid)
        for sock in hostile:
            sock.close()
        logs = stopped(proc)
    refused = [line for line in logs if "exceeds 4194304" in str(line["msg"])]
    assert len(refused) == 8
    assert peak - baseline < 40, (baseline, peak)  # 64 MiB arrived, 480 MiB announced
    assert [s.name for s in receiver.received.spans()] == ["good-0", "good-1"]


def test_records_being_received_are_bounded_together(tmp_path: Path) -> None:
    """Six connections each stall 3.5 MiB into a 4 MiB record; with --receive-bytes 8M
    two fit, the others' records are dropped (logged), the forwarder stays bounded."""
    with running_forwarder(tmp_path, "--receive-bytes", "8M", "--dump-only") as proc:
        baseline = peak_rss_mb(proc.pid)
        stalled = [connected(f"{tmp_path}/f.sock") for _ in range(6)]
        for sock in stalled:
            sock.sendall(HEADER.pack(4 << 20) + b"{" * (7 << 19))
        time.sleep(1.0)
        peak = peak_rss_mb(proc.pid)
        for sock in stalled:
            sock.close()
        logs = stopped(proc)
    full = [line for line in logs if "receive buffer is full" in str(line["msg"])]
    assert len(full) == 4
    cut = [line for line in logs if "cut off by the end of the connection" in str(line["msg"])]
    assert len(cut) == 2
    assert peak - baseline < 40, (baseline, peak)  # 21 MiB sent


def test_queue_is_bounded_in_bytes_while_the_collector_is_down(tmp_path: Path) -> None:
    """Sixty 3 MiB records while the collector is down: the queue holds 16 MiB of them,
    drops and counts the rest, and the forwarder stays far below the 180 MiB sent."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    args = ("--otlp-endpoint", f"http://127.0.0.1:{port}", "--queue-bytes", "16M")
    with running_forwarder(tmp_path, *args) as proc:
        baseline = peak_rss_mb(proc.pid)
        with connected(f"{tmp_path}/f.sock") as sock:
            for n in range(60):
                sock.sendall(our_record(f"big{n}", 1, attribute="x" * (3 << 20)))
        time.sleep(1.0)
        peak = peak_rss_mb(proc.pid)
        logs = stopped(proc)
    assert any(str(line["msg"]).startswith("queue full") for line in logs)
    final = logs[-1]
    assert final["msg"] == "stopped"
    assert final["delivered_spans"] == 0 and final["dropped_spans"] == 60
    assert peak - baseline < 80, (baseline, peak)


def test_connections_beyond_the_limit_are_closed(tmp_path: Path) -> None:
    out = tmp_path / "spans.jsonl"
    with running_forwarder(tmp_path, "--max-connections", "3", "--output", str(out)) as proc:
        time.sleep(0.3)  # the readiness probe's connection is gone
        held = [connected(f"{tmp_path}/f.sock") for _ in range(3)]
        time.sleep(0.3)
        with connected(f"{tmp_path}/f.sock") as extra:
            extra.settimeout(10)
            assert extra.recv(1) == b""  # closed at once
        held[0].sendall(our_record("kept", 1))
        for sock in held:
            sock.close()
        time.sleep(0.5)
        logs = stopped(proc)
    assert any("refusing an agent connection" in str(line["msg"]) for line in logs)
    assert "kept-0" in out.read_text()


def test_collector_refusing_a_request_for_good_does_not_block_the_queue(tmp_path: Path) -> None:
    """HTTP 400 (bad data) is not retried: those spans are counted dropped, the next go on."""
    with HttpReceiver() as receiver:
        endpoint = receiver.endpoint + "/nowhere"
        args = ("--otlp-protocol", "http", "--otlp-endpoint", endpoint)
        with running_forwarder(tmp_path, *args) as proc:
            send(f"{tmp_path}/f.sock", our_record("refused", 2))
            time.sleep(1.0)
            logs = stopped(proc)
    assert any("refused them (HTTP 404" in str(line["msg"]) for line in logs)
    assert logs[-1]["dropped_spans"] == 2


# --- its socket file --------------------------------------------------------------


def start_forwarder(path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*FORWARDER, "--listen", f"unix://{path}", "--dump-only"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    while "forwarding" not in (line := proc.stderr.readline()):
        assert line, "the forwarder exited before listening"
    return proc


def test_socket_file_is_removed_on_sigterm(tmp_path: Path) -> None:
    """Also as root, when the forwarder runs as nobody and may not write the directory."""
    path = tmp_path / "f.sock"
    proc = start_forwarder(path)
    assert path.is_socket()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not path.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="the remover exists when privileges are dropped")
def test_socket_file_is_removed_after_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "f.sock"
    proc = start_forwarder(path)
    proc.kill()
    proc.wait(30)
    for _ in range(200):  # the remover notices the end of its pipe
        if not path.exists():
            break
        time.sleep(0.05)
    assert not path.exists()
