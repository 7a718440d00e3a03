"""kata-trace-view on the spans of a real agent and of kata-agent-ctl --trace, as the
forwarder wrote them, and on OTLP/JSON as other tools write it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto_json.collector.trace.v1.trace_service import (
    ExportTraceServiceRequest as ReferenceRequest,
)

from .conftest import run_container_agent
from .receivers import forwarder

CTL = [sys.executable, "-m", "pykata.ctl.cli"]
VIEW = [sys.executable, "-m", "pykata.traceview"]


def view(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VIEW, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def spans_file(tmp_path_factory: pytest.TempPathFactory, rootfs: Path) -> Iterator[Path]:
    """An agent's whole life, traced: calls with no traceparent (children of the agent's
    own span, which lasts as long as the agent), and a kata-agent-ctl --trace run."""
    tmp = tmp_path_factory.mktemp("traced")
    out = tmp / "spans.jsonl"
    address = f"unix://{tmp}/fwd.sock"
    env = {"KATA_AGENT_TRACING": "true", "KATA_AGENT_TRACE_ADDR": address}
    with forwarder(address, "--output", str(out)), run_container_agent(tmp, env=env) as agent:
        time.sleep(1.0)  # the agent lives a while before and after the calls

        def ctl(*args: str) -> None:
            done = subprocess.run(
                [*CTL, "connect", "--server-address", agent.address, *args],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr

        ctl("-c", "Check", "-c", "sleep 0.2", "-c", "Version")
        ctl("--trace", address, "--bundle-dir", str(rootfs), "-c", "run /bin/echo traced")
        time.sleep(1.0)
        assert agent.stop() == 0  # the agent's own span ends, and is sent
    yield out


def spans_of(path: Path) -> list[dict[str, Any]]:
    found = []
    for line in path.read_text().splitlines():
        for resource in json.loads(line)["resourceSpans"]:
            service = resource["resource"]["attributes"][0]["value"]["stringValue"]
            for scope in resource["scopeSpans"]:
                found += [{**s, "service": service} for s in scope["spans"]]
    return found


def test_rpc_spans_are_server_spans_and_calls_client_spans(spans_file: Path) -> None:
    shown = view(str(spans_file))
    assert shown.returncode == 0, shown.stderr
    rows = {
        re.sub(r"\s+", " ", line.split("|")[0]).strip()
        for line in shown.stdout.splitlines()
        if "|" in line
    }
    assert any(re.fullmatch(r"\[kata-agent\] CreateContainer [\d.]+ ms server", r) for r in rows)
    assert any(
        re.fullmatch(r"grpc\.AgentService/CreateContainer [\d.]+ ms client", r) for r in rows
    )
    assert any(re.fullmatch(r"runtime create [\d.]+ ms internal", r) for r in rows)


def bars(shown: str, name: str) -> list[str]:
    return [line.split("|")[1] for line in shown.splitlines() if re.match(rf"\s+{name}\s", line)]


def test_a_long_lived_root_does_not_squash_the_rpcs(spans_file: Path) -> None:
    spans = spans_of(spans_file)
    (root,) = [s for s in spans if s["name"] == "kata-agent"]
    shown = view(str(spans_file), "--trace", root["traceId"][:8])
    assert shown.returncode == 0, shown.stderr
    block = shown.stdout
    assert block.startswith(f"trace {root['traceId']}")
    (check,), (version,), (agent,) = (
        bars(block, "Check"),
        bars(block, "Version"),
        bars(block, "kata-agent"),
    )
    # Check and Version, 0.2 s apart in a life of seconds, are far apart on the bars
    assert check.index("█") < 5 and version.index("█") > 30
    assert agent.startswith("<") and agent.endswith(">")  # the root goes on both sides
    assert "bars:" in block.splitlines()[0]


def test_choose_a_trace_and_a_time_window(spans_file: Path) -> None:
    spans = spans_of(spans_file)
    (root,) = [s for s in spans if s["name"] == "kata-agent"]
    (version,) = [s for s in spans if s["name"] == "Version"]
    listed = view(str(spans_file), "--list")
    assert listed.returncode == 0
    assert len(listed.stdout.splitlines()) == 2  # the agent's trace, the ctl run's
    assert any(line.startswith(root["traceId"]) for line in listed.stdout.splitlines())
    # the window around Version: Check, 0.2 s before, is left out; the root is kept
    since = (int(version["startTimeUnixNano"]) - int(root["startTimeUnixNano"])) / 1e6
    shown = view(
        str(spans_file), "--trace", root["traceId"][:6],
        "--from", f"{since - 50:.3f}ms", "--to", f"{since + 50:.3f}ms",
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert bars(shown.stdout, "Version") and not bars(shown.stdout, "Check")
    assert "trace " in shown.stdout and "kata-agent-ctl" not in shown.stdout
    missing = view(str(spans_file), "--trace", "0000")
    assert missing.returncode == 1 and "no trace '0000' here" in missing.stderr


def test_chrome_export_puts_overlapping_spans_on_tracks_where_they_nest(
    spans_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "chrome.json"
    assert view(str(spans_file), "--chrome", str(out)).returncode == 0
    events = json.loads(out.read_text())["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == len(spans_of(spans_file))  # every span, once
    by_track: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for event in complete:
        by_track[event["tid"]].append(event)
    for track in by_track.values():
        track.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[float] = []
        for event in track:  # each one ends before the next starts, or inside it
            while stack and stack[-1] <= event["ts"]:
                stack.pop()
            assert not stack or event["ts"] + event["dur"] <= stack[-1], event["name"]
            stack.append(event["ts"] + event["dur"])
    # ReadStdout and ReadStderr run at once in a run: not both on one track
    reads = [e for e in complete if e["name"] in ("grpc.AgentService/ReadStdout",
                                                  "grpc.AgentService/ReadStderr")]  # fmt: skip
    overlapping = [
        (a, b)
        for a in reads
        for b in reads
        if a is not b and a["ts"] < b["ts"] + b["dur"] and b["ts"] < a["ts"] + a["dur"]
    ]
    assert overlapping and all(a["tid"] != b["tid"] for a, b in overlapping)
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M"}
    assert all(name.startswith("trace ") for name in names.values())
    assert {e["cat"] for e in complete} == {"server", "client", "internal"}


def test_reads_otlp_json_as_other_tools_write_it(spans_file: Path, tmp_path: Path) -> None:
    """OpenTelemetry's own OTLP/JSON codec writes each request again, pretty-printed;
    then upper-case hex ids, proto field names and the pre-0.19 name for scope spans,
    all of which the specification lets a reader meet: the same spans, the same ids."""
    expected = view(str(spans_file)).stdout
    pretty = tmp_path / "pretty.json"
    documents = [
        ReferenceRequest.from_json(line).to_dict() for line in spans_file.read_text().splitlines()
    ]
    pretty.write_text("\n".join(json.dumps(d, indent=2) for d in documents))
    assert len(pretty.read_text().splitlines()) > 3 * len(documents)
    assert view(str(pretty)).stdout == expected
    for document in documents:
        for resource in document["resourceSpans"]:
            resource["instrumentationLibrarySpans"] = resource.pop("scopeSpans")
            for library in resource["instrumentationLibrarySpans"]:
                library["instrumentationLibrary"] = library.pop("scope", {})
                for span in library["spans"]:
                    span["trace_id"] = span.pop("traceId").upper()
                    span["span_id"] = span.pop("spanId").upper()
                    if "parentSpanId" in span:
                        span["parent_span_id"] = span.pop("parentSpanId")
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(d) + "\n" for d in documents))
    assert view(str(other)).stdout == expected
