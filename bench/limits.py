"""A well-behaved client's Check latency while the agent is attacked (issue 14):
idle, with 2,000 connections held, during a flood of bad frames, and during
a client that pipelines GetDiagnosticData and never reads - one agent, one run.

Each attacker is a process of its own, and so is the measuring client, so
the numbers include what the attack costs the agent in CPU on this 2-CPU
machine, not the attacker's own event loop.

    python bench/limits.py                          # prints JSON results
    python bench/limits.py --into bench/results.json --section BENCHMARKS.md
                                                    # stores them, rewrites this part
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
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
sys.path.insert(0, str(ROOT / "bench"))

from tests.attack import open_fds, request, rss_mb, send_what_fits  # noqa: E402
from tests.peers import wait_for_socket  # noqa: E402

from pykata.api import agent_pb2  # noqa: E402
from pykata.ttrpc.frame import HEADER, FrameDecoder, MessageType  # noqa: E402
from pykata.ttrpc.server import EVENTS_PER_TURN  # noqa: E402

CHECKS = 2000
HELD = 2000
#: Held connections are what this measures, so the agent may keep them all.
MAX_CONNECTIONS = 2100
FLOOD_CONNECTIONS = 4
PIPELINED = 2000
COMMAND = ".venv/bin/python bench/limits.py --into bench/results.json --section BENCHMARKS.md"


def _raise_open_files() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- attackers (each run as `python bench/limits.py --attack KIND ADDRESS`) -----


def attack_hold(address: str) -> None:
    """Open HELD connections and keep them, idle."""
    _raise_open_files()
    held = []
    for _ in range(HELD):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(address.removeprefix("unix://"))
        held.append(sock)
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM})


def attack_flood(address: str) -> None:
    """Bad frames (even stream ids, 10 bytes each) as fast as the agent takes
    them, on FLOOD_CONNECTIONS connections; answers counted and thrown away.
    On SIGTERM, prints how many were answered."""
    socks = []
    for _ in range(FLOOD_CONNECTIONS):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(address.removeprefix("unix://"))
        sock.setblocking(False)
        socks.append(sock)
    chunk = b"".join(HEADER.pack(0, 2 * n + 2, MessageType.REQUEST, 0) for n in range(6000))
    decoders = [FrameDecoder() for _ in socks]
    answered = 0
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    offsets = [0] * len(socks)  # where in `chunk` each stream goes on: frames stay whole
    while not stopping:
        for i, (sock, decoder) in enumerate(zip(socks, decoders, strict=True)):
            offsets[i] = (offsets[i] + send_what_fits(sock, chunk[offsets[i] :])) % len(chunk)
            with contextlib.suppress(BlockingIOError):
                while data := sock.recv(1 << 16):
                    answered += len(decoder.feed(data))
        time.sleep(0.001)
    print(answered, flush=True)


def attack_pipeline(address: str) -> None:
    """PIPELINED GetDiagnosticData written at once; the answers never read."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(address.removeprefix("unix://"))
    sock.setblocking(False)
    diagnostics = agent_pb2.GetDiagnosticDataRequest(log_type="agent")
    wire = b"".join(
        request(2 * n + 1, "grpc.AgentService", "GetDiagnosticData", diagnostics)
        for n in range(PIPELINED)
    )
    send_what_fits(sock, wire)
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM})


ATTACKS = {"hold": attack_hold, "flood": attack_flood, "pipeline": attack_pipeline}


# --- the measuring client (`python bench/limits.py --checks ADDRESS`) ----------


def checks(address: str) -> None:
    import uvloop

    from tracing import check_latencies

    samples = uvloop.run(check_latencies(address, CHECKS))
    print(json.dumps(samples))


def latencies_us(address: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--checks", address],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    samples = sorted(json.loads(out))
    return {
        "median_us": statistics.median(samples) * 1e6,
        "p99_us": samples[int(len(samples) * 0.99)] * 1e6,
    }


def start_attack(kind: str, address: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--attack", kind, address],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_raise_open_files,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cmdline").write_text("")
        address = f"unix://{tmp}/agent.sock"
        log_path = Path(tmp) / "agent.log"
        env = {
            **os.environ,
            "KATA_AGENT_SERVER_ADDR": address,
            "KATA_AGENT_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
            # a debug line per call: the recent log GetDiagnosticData returns is full
            "KATA_AGENT_LOG_LEVEL": "debug",
        }
        with open(log_path, "w") as log_file:
            agent = subprocess.Popen(
                [sys.executable, "-m", "pykata.agent.cli", "--kernel-cmdline", f"{tmp}/cmdline"],
                env=env,
                stderr=log_file,
                preexec_fn=_raise_open_files,
            )
        results: dict[str, Any] = {}
        try:
            wait_for_socket(f"{tmp}/agent.sock", proc=agent)
            latencies_us(address)  # warm-up; fills the recent log
            results["idle"] = latencies_us(address)
            results["idle_rss_mb"] = rss_mb(agent.pid)

            holder = start_attack("hold", address)
            try:
                time.sleep(1)
                results["held_agent_fds"] = open_fds(agent.pid)
                results["held_rss_mb"] = rss_mb(agent.pid)
                results["held"] = latencies_us(address)
            finally:
                stop(holder)

            cpu_before = cpu_seconds(agent.pid)
            flood = start_attack("flood", address)
            try:
                started = time.perf_counter()
                results["flood"] = latencies_us(address)
                elapsed = time.perf_counter() - started
                results["flood_rss_mb"] = rss_mb(agent.pid)
            finally:
                stop(flood)
            assert flood.stdout is not None
            results["flood_frames"] = int(flood.stdout.read())
            results["flood_agent_cpu_share"] = (cpu_seconds(agent.pid) - cpu_before) / elapsed

            pipeline = start_attack("pipeline", address)
            try:
                time.sleep(1)
                results["pipeline"] = latencies_us(address)
                results["pipeline_rss_mb"] = rss_mb(agent.pid)
            finally:
                stop(pipeline)
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)
        # What the flood cost in log: the warnings about the flooding peer
        # (each stands for itself and the `suppressed` count it carries).
        about_peer = [
            line
            for line in log_path.read_text().splitlines()
            if '"peer_pid"' in line and '"refused connection' not in line
        ]
        results["flood_frames_per_s"] = results["flood_frames"] / elapsed
        results["flood_log_lines"] = len(about_peer)
        results["flood_log_bytes"] = sum(len(line) + 1 for line in about_peer)
        results["flood_warnings_accounted"] = sum(
            1 + json.loads(line).get("suppressed", 0) for line in about_peer
        )
        results["held_target"] = HELD
        results["checks"] = CHECKS
    return results


def _rows(lim: dict[str, Any]) -> str:
    rows = [
        ("idle", "idle"),
        (
            f"{lim['held_target']:,} idle connections held "
            f"({lim['held_agent_fds']:,} fds open in the agent)",
            "held",
        ),
        (
            f"a flood of bad frames ({lim['flood_frames_per_s']:,.0f} frames/s answered "
            f"INVALID_ARGUMENT, on {FLOOD_CONNECTIONS} connections)",
            "flood",
        ),
        (f"{PIPELINED:,} pipelined GetDiagnosticData (~200 KB answers) never read", "pipeline"),
    ]
    return "\n".join(
        f"| {label} | {lim[key]['median_us']:.0f} us | {lim[key]['p99_us']:.0f} us "
        f"| {lim[f'{key}_rss_mb']:.1f} MB |"
        for label, key in rows
    )


def report_section(lim: dict[str, Any]) -> str:
    """This part of BENCHMARKS.md."""
    command = lim.get("command", "make bench")
    return f"""## Under attack (the agent's limits)

A well-behaved client's sequential `Health/Check` round trip ({lim["checks"]:,} calls
per row, a process of its own) against one agent, in one run, while another
process attacks it. Measured {lim["date"]} by `{command}`;
the limits are in docs/agent.md.

| while | median | p99 | agent RSS |
|---|---:|---:|---:|
{_rows(lim)}

The flood's {lim["flood_frames"]:,} bad frames, each answered, cost
{lim["flood_log_lines"]} log lines ({lim["flood_log_bytes"]:,} bytes) naming the peer; with
their `suppressed` counts those lines account for {lim["flood_warnings_accounted"]:,} warnings
(the frames, and the connections closed mid-frame when the attacker
stopped). The agent used {lim["flood_agent_cpu_share"]:.0%} of a CPU meanwhile; a connection
handles at most {EVENTS_PER_TURN} requests per turn of the event loop, so the bystander
waits for one turn of each flooding connection, not for the flood.

The agent runs with `max_connections={MAX_CONNECTIONS}` here, so that it really holds
the {lim["held_target"]:,} connections (at the default, 128, it holds 128 and closes the
rest at once), and at debug level, so that every call adds a line to the
recent log that GetDiagnosticData returns.
"""


def replace_section(document: str, section: str) -> str:
    """`document` with this part replaced (or put before the guest VM's)."""
    title = section.splitlines()[0]
    if title in document:
        start = document.index(title)
        end = document.find("\n## ", start + len(title))
        return document[:start] + section + (document[end + 1 :] if end >= 0 else "")
    anchor = document.find("## Guest VM")
    if anchor < 0:
        anchor = document.find("## Reproduce")
    return document[:anchor] + section + "\n" + document[anchor:]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--attack", nargs=2, metavar=("KIND", "ADDRESS"), help=argparse.SUPPRESS)
    parser.add_argument("--checks", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--into", metavar="RESULTS_JSON", help="store under 'limits' in this file")
    parser.add_argument(
        "--section", metavar="BENCHMARKS_MD", help="and rewrite this part of that file"
    )
    args = parser.parse_args()
    if args.attack:
        ATTACKS[args.attack[0]](args.attack[1])
        return
    if args.checks:
        checks(args.checks)
        return
    results = measure()
    results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results["command"] = COMMAND
    if args.section:
        path = Path(args.section)
        path.write_text(replace_section(path.read_text(), report_section(results)))
    if args.into:
        path = Path(args.into)
        stored = json.loads(path.read_text()) if path.exists() else {}
        stored["limits"] = results
        path.write_text(json.dumps(stored, indent=2) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
