"""The command lines of every tool, as a user meets them: upstream's flags and values,
help that says what each option does and its default, exit status 2 for a command
line a tool cannot act on, and one line - never a traceback - for a user's mistake."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .receivers import FORWARDER, GrpcReceiver
from .test_tracing import send, some_spans

TOOLS = {
    "kata-agent-ctl": "pykata.ctl.cli",
    "kata-trace-forwarder": "pykata.forwarder.cli",
    "kata-trace-view": "pykata.traceview",
    "kata-container-trace": "pykata.containertrace.cli",
    "kata-agent": "pykata.agent.cli",
    "kata-guest-image": "pykata.vm.image",
}
SUBCOMMANDS = {
    "kata-agent-ctl": [
        "connect",
        "vm",
        "console",
        "capabilities",
        "port-forward",
        "cp",
        "exec",
        "watch",
        "generate-cid",
        "generate-sid",
        "examples",
    ],
    "kata-container-trace": ["record", "summary", "chrome"],
}


def tool(name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", TOOLS[name], *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def options(help_text: str) -> dict[str, str]:
    """Each option of a --help text and the text describing it."""
    found: dict[str, str] = {}
    current = None
    section = ""
    for line in help_text.splitlines():
        if line and not line.startswith(" "):
            section, current = line, None
            continue
        if not ("options" in section or section.startswith("guest VM")):
            continue
        entry = re.match(r"  (-\S+(?: \S+)?(?:, -\S+(?: \S+)?)*)( {2,}(.*))?$", line)
        if entry:
            current = entry.group(1)
            found[current] = entry.group(3) or ""
        elif current is not None and line.startswith("      "):
            found[current] += " " + line.strip()
    return found


# --- help ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [[name] for name in TOOLS]
    + [[name, sub] for name, subs in SUBCOMMANDS.items() for sub in subs],
    ids=lambda c: " ".join(c),
)
def test_every_option_says_what_it_does_and_its_default(command: list[str]) -> None:
    shown = tool(command[0], *command[1:], "--help")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: ")
    described = options(shown.stdout)
    assert described, shown.stdout
    for option, text in described.items():
        if option.startswith(("-h, --help", "--version")):
            continue
        assert text, f"{' '.join(command)} {option}: no description"
        assert "default" in text or "(required)" in text, f"{option}: {text!r} has no default"
    # subcommands have a line each in their tool's help
    for sub in SUBCOMMANDS.get(command[0], []) if len(command) == 1 else []:
        assert re.search(rf"\n    {sub} +\S", shown.stdout), f"{sub} has no description"


def test_connect_help_shows_the_syntax_the_builtins_and_examples() -> None:
    shown = tool("kata-agent-ctl", "connect", "--help").stdout
    assert "Syntax: NAME [field=value ...] | NAME json://{...}" in shown
    assert "$'...'" in shown and "signal=KILL" in shown
    builtins = shown.split("built-in commands:\n")[1].split("\n\n")[0].splitlines()
    names = [line.split()[0] for line in builtins if not line.startswith("    ")]
    assert names == ["run", "echo", "help", "list", "repeat", "sleep", "quit"]
    # the descriptions start in one column, wrapped lines too
    starts = {len(line) - len(line.lstrip()) for line in builtins if line.startswith("    ")}
    starts |= {match.start(1) for line in builtins if (match := re.match(r"  \S.*?  +(\S)", line))}
    assert len(starts) == 1, builtins
    assert "examples:\n  kata-agent-ctl connect --server-address" in shown


# --- upstream's flags, and exit status 2 ------------------------------------------------


def test_forwarder_takes_upstreams_jaeger_options_as_the_otlp_endpoint(tmp_path: Path) -> None:
    with GrpcReceiver() as receiver:
        proc = subprocess.Popen(
            [*FORWARDER, "--listen", f"unix://{tmp_path}/f.sock",
             "--jaeger-host", "127.0.0.1", "--jaeger-port", str(receiver.port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not (tmp_path / "f.sock").exists():
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            send(f"{tmp_path}/f.sock", some_spans(2))
            assert len(receiver.received.wait_for(2)) == 2  # they reached the mapped endpoint
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
    logged = [json.loads(line) for line in err.splitlines()]
    deprecation = [line for line in logged if "deprecated" in line["msg"]]
    assert len(deprecation) == 1 and deprecation[0]["level"] == "WARN"
    assert f"use --otlp-endpoint http://127.0.0.1:{receiver.port}" in deprecation[0]["msg"]
    # upstream's old default port is Jaeger's Thrift port, which takes no OTLP: 4317 then
    checked = tool("kata-trace-forwarder", "--jaeger-host", "collector", "--jaeger-port", "6831",
                   "--listen", "tcp://nowhere")  # fmt: skip
    assert checked.returncode == 2  # the address; the endpoint was worked out first
    both = tool("kata-trace-forwarder", "--jaeger-host", "h", "--otlp-endpoint", "http://h:4317")
    assert both.returncode == 2 and "give --otlp-endpoint, or the deprecated" in both.stderr


def test_forwarder_vsock_cid_any_as_upstream(tmp_path: Path) -> None:
    """Bind and listen only: this machine has no vsock peer to send from."""
    port = str(30000 + int(time.time() * 1000) % 20000)
    proc = subprocess.Popen(
        [*FORWARDER, "--vsock-cid", "any", "--vsock-port", port, "--dump-only"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        while "forwarding" not in (line := proc.stderr.readline()):
            assert line, "the forwarder exited before listening"
        assert f'"listen": "vsock://-1:{port}"' in line
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    for bad in (["--vsock-cid", "some"], ["--vsock-port", "0"], ["--vsock-port", "x"]):
        refused = tool("kata-trace-forwarder", *bad)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, bad


@pytest.mark.parametrize(
    ("name", "args", "says"),
    [
        (
            "kata-agent-ctl",
            ["connect", "--server-address", "tcp://x", "-c", "Check"],
            "--server-address: invalid address 'tcp://x'",
        ),
        (
            "kata-agent-ctl",
            [
                "connect",
                "--server-address",
                "unix:///x.sock",
                "--bundle-dir",
                "/no/such/bundle",
                "-c",
                "run",
            ],
            "--bundle-dir /no/such/bundle",
        ),
        ("kata-agent-ctl", ["connect", "--server-address", "unix:///x.sock"], "nothing to do"),
        (
            "kata-agent-ctl",
            ["connect", "--server-address", "unix:///x", "--timeout", "x"],
            "is not a duration",
        ),
        ("kata-agent-ctl", ["console", "tcp://x"], "invalid address"),
        ("kata-agent-ctl", ["frobnicate"], "invalid choice"),
        ("kata-trace-forwarder", ["--listen", "tcp://x"], "--listen: invalid address"),
        ("kata-trace-forwarder", ["--trace-name", ""], "--trace-name cannot be blank"),
        ("kata-trace-forwarder", ["--queue-bytes", "lots"], "is not a size"),
        ("kata-trace-view", ["x.jsonl", "--from", "later"], "is not a time"),
        ("kata-trace-view", ["x.jsonl", "--width", "3"], "--width must be at least 10"),
        ("kata-container-trace", ["chrome", "somewhere"], "required"),
    ],
)
def test_command_line_errors_exit_2_in_one_line(name: str, args: list[str], says: str) -> None:
    done = tool(name, *args)
    assert done.returncode == 2, done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr


# --- a user's mistake: one line, no traceback ----------------------------------------


@pytest.mark.parametrize(
    ("name", "args", "says"),
    [
        ("kata-trace-view", ["/no/such/spans.jsonl"], "cannot read: No such file or directory"),
        ("kata-trace-view", ["/"], "cannot read: Is a directory"),
        ("kata-trace-view", ["/bin/true"], "not a text file"),
        (
            "kata-trace-view",
            ["SPANS", "--chrome", "/no/such/dir/out.json"],
            "cannot write /no/such/dir/out.json: No such file or directory",
        ),
        ("kata-trace-view", ["SPANS", "--trace", "ffff"], "no trace 'ffff' here"),
        ("kata-trace-view", ["GARBAGE"], "line 2 is not JSON"),
        ("kata-container-trace", ["summary", "/no/such/trace"], "no such trace directory"),
        ("kata-container-trace", ["summary", "EMPTY"], "no LTTng trace here"),
        (
            "kata-container-trace",
            ["chrome", "EMPTY", "-o", "x.json", "--spans", "/no/such"],
            "--spans /no/such: no such file",
        ),
        (
            "kata-trace-forwarder",
            ["--listen", "unix:///no/such/dir/f.sock"],
            "cannot listen on unix:///no/such/dir/f.sock: No such file or directory",
        ),
        (
            "kata-trace-forwarder",
            ["--listen", "unix://SOCKET", "--output", "/no/such/dir/x"],
            "cannot write /no/such/dir/x: No such file or directory",
        ),
        (
            "kata-agent-ctl",
            ["connect", "--server-address", "unix:///no/such.sock", "-c", "Check"],
            "cannot connect to unix:///no/such.sock: No such file or directory",
        ),
        # a guest's run directory that cannot be made (after "booting the guest ...")
        ("kata-agent-ctl", ["vm", "--run-dir", "/proc/no/such"], None),
    ],
)
def test_a_users_mistake_is_one_line_never_a_traceback(
    tmp_path: Path, name: str, args: list[str], says: str | None
) -> None:
    (tmp_path / "empty").mkdir()
    spans = tmp_path / "spans.jsonl"
    spans.write_text(json.dumps({"resourceSpans": []}) + "\n")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text(json.dumps({"resourceSpans": []}) + "\n{not json\n")
    places = {
        "SPANS": str(spans),
        "GARBAGE": str(garbage),
        "EMPTY": str(tmp_path / "empty"),
        "SOCKET": str(tmp_path / "f.sock"),
    }
    done = tool(name, *[places.get(a, a.replace("SOCKET", places["SOCKET"])) for a in args])
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    if says is not None:
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert says in done.stderr
