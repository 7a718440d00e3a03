"""kata-agent-ctl as a user runs it: a subprocess against a real agent."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import AgentProcess, run_container_agent
from .peers import FakeVmm

CTL = [sys.executable, "-m", "pykata.ctl.cli"]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    with run_container_agent(tmp_path) as running:
        yield running


def ctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CTL, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def connect(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return ctl("connect", "--server-address", agent.address, *args)


def test_check_and_version(agent: AgentProcess) -> None:
    result = connect(agent, "-c", "Check", "-c", "Version")
    assert result.returncode == 0, result.stderr
    assert '"status": "SERVING"' in result.stdout and '"agent_version": "0.1.0"' in result.stdout


def test_json_output_one_object_per_line(agent: AgentProcess) -> None:
    result = connect(
        agent,
        "--output",
        "json",
        "--ignore-errors",
        "-c",
        "Check",
        "-c",
        "StartContainer container_id=nope",
    )
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines == [
        {"command": "Check", "status": "OK", "response": {"status": "SERVING"}},
        {"command": "StartContainer", "status": "INTERNAL", "message": "no container 'nope'"},
    ]
    assert result.returncode == 0  # --ignore-errors


def test_full_container_lifecycle_with_auto_values(agent: AgentProcess, rootfs: Path) -> None:
    result = connect(
        agent,
        "--bundle-dir",
        str(rootfs),
        "-c",
        "CreateSandbox hostname=ctl-box",
        "-c",
        "CreateContainer OCI.Process.Args=/bin/sh OCI.Process.Args=-c "
        "'OCI.Process.Args=hostname; exit 5'",
        "-c",
        "StartContainer",
        "-c",
        "ReadStdout",
        "-c",
        "WaitProcess",
        "-c",
        "ExecProcess process.Args=/bin/echo process.Args=exec-out",
        "-c",
        "RemoveContainer",
        "-c",
        "DestroySandbox",
    )
    # the exec goes to a stopped container: a clear failure, and the run stops there
    assert result.returncode == 1
    assert "ctl-box" in result.stdout
    assert '"status": 5' in result.stdout
    assert "ExecProcess: INTERNAL" in result.stdout
    assert "RemoveContainer" not in result.stdout


def test_run_streams_output_and_exit_code(agent: AgentProcess, rootfs: Path) -> None:
    result = connect(
        agent,
        "--bundle-dir",
        str(rootfs),
        "-c",
        "run /bin/sh -c 'echo to-out; echo to-err >&2; exit 3'",
    )
    assert result.returncode == 3, result.stderr  # the container's, as docker run's
    assert result.stdout == "to-out\n"
    assert result.stderr == "to-err\nexit code 3\n"
    # several runs one after another: nothing to clean up in between
    for _ in range(2):
        again = connect(
            agent, "--bundle-dir", str(rootfs), "-c", "CreateSandbox", "-c", "run /bin/true"
        )
        assert again.returncode == 0, again.stdout + again.stderr


def test_json_and_file_forms(agent: AgentProcess, rootfs: Path, tmp_path: Path) -> None:
    request = tmp_path / "create.json"
    request.write_text(
        json.dumps(
            {
                "container_id": "fromfile",
                "OCI": {
                    "Root": {"Path": str(rootfs)},
                    "Process": {"Args": ["/bin/sleep", "30"], "Cwd": "/"},
                    "Mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
                },
            }
        )
    )
    result = connect(
        agent,
        "--no-auto-values",
        "-c",
        f"CreateContainer file://{request}",
        "-c",
        'StartContainer json://{"container_id": "fromfile"}',
        "-c",
        'StatsContainer json://{"container_id": "fromfile"}',
        "-c",
        "RemoveContainer container_id=fromfile",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"cgroup_stats"' in result.stdout


def test_bad_field_names_the_field_and_the_valid_ones(agent: AgentProcess) -> None:
    result = connect(agent, "-c", "StartContainer containerid=x", "-c", "Check")
    assert result.returncode == 1
    assert "StartContainerRequest has no field 'containerid'" in result.stdout
    assert "its fields: container_id" in result.stdout
    assert "Check" not in result.stdout.split("\n", 1)[1]  # stopped at the failure


def test_unknown_command_suggests(agent: AgentProcess) -> None:
    result = connect(agent, "-c", "Chek")
    assert result.returncode == 1 and "did you mean Check" in result.stdout


def test_unreachable_address_is_one_line_and_non_zero(tmp_path: Path) -> None:
    result = ctl("connect", "--server-address", f"unix://{tmp_path}/none.sock", "-c", "Check")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"kata-agent-ctl: cannot connect to unix://{tmp_path}/none.sock: No such file or directory"
    ]
    bad = ctl("connect", "--server-address", "tcp://1.2.3.4:1", "-c", "Check")
    assert bad.returncode == 2 and "accepted forms" in bad.stderr  # a command-line error


async def test_hybrid_vsock_through_a_fake_vmm(agent: AgentProcess, tmp_path: Path) -> None:
    """A VMM socket cannot exist here: the fake one in tests/peers.py stands in for it."""
    assert agent.socket_path
    async with FakeVmm(tmp_path / "vmm.sock", {1024: agent.socket_path}) as vmm:
        result = await asyncio.to_thread(
            ctl,
            "connect",
            "--server-address",
            f"unix://{tmp_path}/vmm.sock",
            "--hybrid-vsock",
            "--hybrid-vsock-port",
            "1024",
            "-c",
            "Check",
        )
    assert result.returncode == 0, result.stderr
    assert '"SERVING"' in result.stdout and vmm.connects == ["CONNECT 1024\n"]


def test_other_subcommands() -> None:
    assert re.fullmatch(r"[0-9a-f]{32}\n", ctl("generate-cid").stdout)
    assert re.fullmatch(r"[0-9a-f]{32}\n", ctl("generate-sid").stdout)
    examples = ctl("examples").stdout
    assert "--hybrid-vsock" in examples and "vsock://" in examples and "unix://@" in examples
    both = ctl("connect", "--server-address", "unix:///x", "--vm", "qemu", "-c", "Check")
    assert both.returncode == 2 and "either --server-address" in both.stderr
    no_image = ctl("connect", "--vm", "qemu", "--guest-dir", "/nonexistent", "-c", "Check")
    assert no_image.returncode == 1
    assert "no guest image in /nonexistent: build one with `make guest-image`" in no_image.stderr


class Terminal:
    """The tool on a pseudo-terminal, as a person would type at it."""

    def __init__(self, args: list[str], home: Path) -> None:
        self.master, slave = pty.openpty()
        env = {**os.environ, "KATA_AGENT_CTL_HISTORY": str(home / "history"), "TERM": "dumb"}
        self.proc = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True
        )
        os.close(slave)
        self.seen = b""

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def expect(self, pattern: str, timeout: float = 15) -> str:
        """Everything up to and including the first match; the rest stays for later."""
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern.encode(), self.seen)):
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} in {self.seen[-500:]!r}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    self.seen += os.read(self.master, 4096)
                except OSError:  # the tool has exited
                    break
        assert match, f"no {pattern!r} before the tool exited: {self.seen[-500:]!r}"
        found, self.seen = self.seen[: match.end()], self.seen[match.end() :]
        return found.decode(errors="replace")

    def close(self) -> int:
        code = self.proc.wait(15)
        os.close(self.master)
        return code


def test_interactive_mode_with_completion_and_help(agent: AgentProcess, tmp_path: Path) -> None:
    term = Terminal([*CTL, "connect", "--server-address", agent.address, "--interactive"], tmp_path)
    term.expect("kata-agent-ctl> ")
    term.type("Check\n")
    term.expect("SERVING")
    term.type("Vers\t")  # completes the command name
    term.expect("Version")
    term.type("\n")
    term.expect('"agent_version"')
    term.type("StartContainer contai\t")  # completes the field name
    term.expect("container_id=")
    term.type("nope\n")
    term.expect("INTERNAL")
    term.expect("kata-agent-ctl> ")
    term.type("help CreateSandbox\n")
    fields = term.expect("kata-agent-ctl> ")
    assert re.search(r"\n  hostname +string\r", fields)
    # the types start in one column
    rows = [line for line in fields.split("\r\n")[2:-1] if line.startswith("  ")]
    assert len({len(re.match(r"(\s*\S+\s+)", row).group(1)) for row in rows}) == 1, rows  # type: ignore[union-attr]
    term.type("help Sig\t")  # help <TAB>: a command's name
    term.expect("help SignalProcess")
    term.type("\n")
    assert "signal        uint32" in term.expect("kata-agent-ctl> ")
    term.type("help\n")
    table = term.expect("kata-agent-ctl> ").split("Built-in commands:\r\n\r\n")[1]
    table = table.split("\r\n\r\n")[0]
    builtins = [line for line in table.split("\r\n") if re.match(r"  \w", line)]
    starts = {re.match(r"  \S.*?  +\S", line).end() for line in builtins}  # type: ignore[union-attr]
    assert len(builtins) == 7 and len(starts) == 1, builtins
    term.type("quit\n")
    assert term.close() == 1  # one command failed
    assert "StartContainer container_id=nope" in (tmp_path / "history").read_text()


def test_bundle_with_config_json_gets_an_absolute_rootfs(
    agent: AgentProcess, rootfs: Path, tmp_path: Path
) -> None:
    from .containers import template

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "rootfs").symlink_to(rootfs)
    config = template()  # root.path is the relative "rootfs", as `runc spec` writes it
    assert config["root"]["path"] == "rootfs"
    (bundle / "config.json").write_text(json.dumps(config))
    result = connect(agent, "--bundle-dir", str(bundle), "-c", "run /bin/echo from-bundle")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "from-bundle\n"


# --- values as upstream's tool and the shell take them --------------------------------


def test_signals_by_name_and_upstreams_short_names(agent: AgentProcess, rootfs: Path) -> None:
    script = (
        'trap "echo got-USR1" USR1; trap "echo got-TERM" TERM; echo ready; '
        "while :; do sleep 0.1; done"
    )
    create = (
        f"CreateContainer OCI.Process.Args=/bin/sh OCI.Process.Args=-c 'OCI.Process.Args={script}'"
    )
    result = ctl(
        "-l", "debug", "connect", "--server-address", agent.address, "--bundle-dir", str(rootfs),
        "-c", create,
        "-c", "StartContainer", "-c", "ReadStdout",
        "-c", "SignalProcess signal=usr1 sid=ignored-as-upstream-ignores-it", "-c", "sleep 0.5",
        "-c", "SignalProcess signal=SIGTERM", "-c", "sleep 0.5",
        "-c", "SignalProcess exec_id= signal=KILL",
        "-c", "WaitProcess", "-c", "ReadStdout len=65536", "-c", "RemoveContainer",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    sent = [
        line["request"]["signal"]
        for line in map(json.loads, result.stderr.splitlines())
        if line.get("call") == "grpc.AgentService/SignalProcess"
    ]
    assert sent == [10, 15, 9]
    assert "got-USR1\ngot-TERM\n" in result.stdout and '"status": 137' in result.stdout
    bad = connect(agent, "-c", "SignalProcess signal=SIGFOO")
    assert bad.returncode == 1
    assert "signal: 'SIGFOO' is not a valid signal (a number, or a name such as KILL" in bad.stdout
    alias = connect(agent, "-c", "StatsContainer cid=no-such-container")
    assert "no-such-container" in alias.stdout and "INVALID_ARGUMENT" in alias.stdout


def test_words_follow_the_shells_quoting_and_bytes_take_escapes(
    agent: AgentProcess, rootfs: Path
) -> None:
    said = connect(agent, "-c", r"""echo a\ b "c  \"d\"" 'e  \n' $'f\tg' h"i"j""")
    assert said.stdout == 'a b c  "d" e  \\n f\tg hij\n'
    unterminated = connect(agent, "-c", "echo 'open")
    assert unterminated.returncode == 1 and "no closing '" in unterminated.stdout
    # bytes fields: printf's escapes, hex: as upstream's tool, bash's $'...' before them
    result = subprocess.run(
        [
            *CTL, "connect", "--server-address", agent.address, "--bundle-dir", str(rootfs),
            "-c", "CreateContainer OCI.Process.Args=/bin/cat", "-c", "StartContainer",
            "-c", r"WriteStdin data='tab\there\n'",
            "-c", r'WriteStdin data="\x41\102\0"',
            "-c", "WriteStdin data=hex:ff0a",
            "-c", r"WriteStdin data=$'dollar\tquote\n'",
            "-c", "CloseStdin", "-c", "WaitProcess", "-c", "ReadStdout len=65536",
            "-c", "RemoveContainer",
        ],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert b'"status": 0\n}\ntab\there\nAB\x00\xff\ndollar\tquote\nRemoveContainer' in result.stdout


def test_field_names_are_shown_as_typed_in_errors_and_logs(agent: AgentProcess) -> None:
    result = ctl(
        "-l", "debug", "connect", "--server-address", agent.address, "--ignore-errors",
        "-c", 'StartContainer json://{"containerid": "x"}',
        "-c", """CreateContainer 'OCI.Process={"argz": ["/bin/sh"]}'""",
        "-c", "OnlineCPUMem nb_cpus=-1",
        "-c", "StartContainer container_id=typed-id",
        "-c", "CreateContainer file:///no/such.json",
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "StartContainer: INVALID_ARGUMENT: StartContainerRequest has no field 'containerid' "
        "(in 'containerid'); its fields: container_id"
    )
    assert "Process has no field 'argz' (in 'OCI.Process.argz')" in lines[1]
    assert "Args" in lines[1] and "camel" not in lines[1].lower()
    assert lines[2] == "OnlineCPUMem: INVALID_ARGUMENT: nb_cpus: -1 is out of range for a uint32"
    assert lines[4] == (
        "CreateContainer: INVALID_ARGUMENT: cannot read file:///no/such.json: "
        "No such file or directory"
    )
    assert "Traceback" not in result.stderr
    logged = [json.loads(line) for line in result.stderr.splitlines()]
    assert {"container_id": "typed-id"} in [line.get("request") for line in logged]
    assert "containerId" not in result.stderr


def test_get_metrics_is_prometheus_text_and_json_only_when_asked(agent: AgentProcess) -> None:
    text = connect(agent, "-c", "GetMetrics")
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert lines[0].startswith("# HELP ") and len(lines) > 20
    assert all(re.match(r"(# (HELP|TYPE) \w+ |\w+(\{.*\})? \S+$)", line) for line in lines)
    assert any(line.startswith("kata_agent_scrape_total ") for line in lines)
    as_json = connect(agent, "--output", "json", "-c", "GetMetrics")
    (reply,) = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert reply["command"] == "GetMetrics" and "# HELP" in reply["response"]["metrics"]


def test_timeout_takes_upstreams_human_durations(agent: AgentProcess) -> None:
    assert connect(agent, "--timeout", "500ms", "-c", "Check").returncode == 0
    waited = connect(agent, "--timeout", "300ms", "-c", "GetOOMEvent")  # never answers
    assert waited.returncode == 1 and "DEADLINE_EXCEEDED" in waited.stdout
    bad = connect(agent, "--timeout", "soon", "-c", "Check")
    assert bad.returncode == 2 and "is not a duration" in bad.stderr
