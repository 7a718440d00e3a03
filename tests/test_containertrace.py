"""kata-container-trace: real LTTng sessions around real container runs.

Userspace only: these machines cannot load LTTng's kernel modules.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pykata.containertrace import ctf, session

from .peers import processes_with

ROOT = Path(__file__).resolve().parent.parent
TRACE = [sys.executable, "-m", "pykata.containertrace.cli"]


def wait_until(condition: object, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def helpers() -> list[str]:
    """Command lines of running recorder helpers (they live in its work directory)."""
    return processes_with("/kata-container-trace-")


def record(
    out: Path, name: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TRACE, "record", "--name", name, "--output-dir", str(out), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=out.parent,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.lttng
def test_record_a_container_run(tmp_path: Path) -> None:
    done = record(
        tmp_path / "traces",
        f"t{os.getpid()}",
        *("--count", "3", "--command", "ls /"),
        env={"SUDO_UID": "65534", "SUDO_GID": "65534"},  # as if run through sudo
    )
    assert done.returncode == 0, done.stderr
    assert "kernel tracing unavailable" in done.stderr  # said once, then userspace only
    assert f"t{os.getpid()}" not in session.sessions()  # nothing left recording
    trace = tmp_path / "traces" / f"t{os.getpid()}"
    # the trace belongs to whoever ran sudo, every file of it
    assert {(f.stat().st_uid, f.stat().st_gid) for f in [trace, *trace.rglob("*")]} == {
        (65534, 65534)
    }
    owners = json.loads((trace / ctf.CONTAINERS_FILE).read_text())
    (container_id,) = owners
    events = list(ctf.events(trace))
    in_container = [e for e in events if e.pid_ns == owners[container_id]]
    # the container ran `ls` three times, each a traced process of its own
    assert len({e.vpid for e in in_container if e.procname == "ls"}) == 3
    # and the agent's own log records arrived through LTTng's Python agent
    agent = [e for e in events if e.name == "lttng_python:event"]
    messages = {e.fields["msg"] for e in agent}
    assert "container created" in messages and "container removed" in messages
    assert all(e.fields["logger_name"].startswith("pykata") for e in agent)
    summary = ctf.summarise(trace)
    assert summary.by_container[container_id] == len(in_container)
    assert f"per container:\n  {container_id}" in summary.text()

    chrome = tmp_path / "trace.json"
    converted = subprocess.run(
        [*TRACE, "chrome", str(trace), "-o", str(chrome)], capture_output=True, text=True
    )
    assert converted.returncode == 0, converted.stderr
    trace_events = json.loads(chrome.read_text())["traceEvents"]
    assert len([e for e in trace_events if e["ph"] == "i"]) == len(events)
    labels = {e["args"]["name"]: e["pid"] for e in trace_events if e["ph"] == "M"}
    assert f"ls [{container_id}]" in labels
    # the agent's spans of the same run share the timeline: the container's processes
    # run after its StartContainer span began and before its RemoveContainer did
    spans = {
        e["name"]: e
        for e in trace_events
        if e["ph"] == "X" and e["args"].get("container_id") == container_id
    }
    container_rows = {pid for name, pid in labels.items() if name.endswith(f"[{container_id}]")}
    ts = [e["ts"] for e in trace_events if e["ph"] == "i" and e["pid"] in container_rows]
    assert spans["StartContainer"]["ts"] < min(ts) and max(ts) < spans["RemoveContainer"]["ts"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
@pytest.mark.lttng
def test_no_session_is_left_behind(tmp_path: Path, sig: int) -> None:
    name = f"cut{os.getpid()}{int(sig)}"
    recorder = subprocess.Popen(
        [*TRACE, "record", "--name", name, "--command", "sleep 30", "--output-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert wait_until(lambda: name in session.sessions()), "the session never started"
        recorder.send_signal(sig)
        status = recorder.wait(60)
        # whatever ended the recorder - Ctrl-C, or a kill it could not catch -
        # the session goes (the guard process destroys it in the second case)
        assert wait_until(lambda: name not in session.sessions(), timeout=15)
        # and so do its agent and forwarder (and with the agent, the container)
        assert wait_until(lambda: not helpers(), timeout=15), helpers()
        if sig == signal.SIGINT:
            assert status == 130 and "interrupted" in recorder.stderr.read()  # type: ignore[union-attr]
        assert not (tmp_path / name).exists()
    finally:
        if recorder.poll() is None:
            recorder.kill()


@pytest.mark.lttng
def test_failing_container_and_failing_runtime(tmp_path: Path) -> None:
    failing = record(tmp_path, f"f{os.getpid()}", "--command", "ls /nonexistent")
    # a command that fails is still traced, and its status said
    assert failing.returncode == 0, failing.stderr
    assert "container exit status 2" in failing.stdout
    assert (tmp_path / f"f{os.getpid()}" / ctf.CONTAINERS_FILE).exists()
    broken = record(tmp_path, f"b{os.getpid()}", "--runtime", "/no/such/runtime")
    assert broken.returncode == 1 and "/no/such/runtime" in broken.stderr
    assert "Traceback" not in broken.stderr
    assert not {f"f{os.getpid()}", f"b{os.getpid()}"} & set(session.sessions())


def test_clean_traces_removes_traces_and_nothing_else(tmp_path: Path) -> None:
    traces = tmp_path / "lttng-traces"
    (traces / "kata-1" / "ust").mkdir(parents=True)
    (tmp_path / "keep.txt").write_text("mine")
    subprocess.run(
        ["make", "-s", "-C", str(ROOT), "clean-traces", f"TRACES_DIR={traces}"], check=True
    )
    assert not traces.exists() and (tmp_path / "keep.txt").read_text() == "mine"
