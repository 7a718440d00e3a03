"""The debug console and the log port of a real agent (stand-alone: unix sockets;
the VSOCK ports of a guest have no peer on these machines)."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata.api import health_pb2
from pykata.ttrpc import Client

from .conftest import AgentProcess, run_agent
from .peers import wait_for_socket
from .terminal import Terminal

CTL = [sys.executable, "-m", "pykata.ctl.cli"]


def ctl_console(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CTL, "console", address, *args], capture_output=True, text=True, timeout=30
    )


@contextlib.contextmanager
def console_agent(tmp_path: Path) -> Iterator[tuple[AgentProcess, str]]:
    """An agent serving its debug console on a unix socket: (agent, console address)."""
    console = f"unix://{tmp_path}/console.sock"
    env = {"KATA_AGENT_DEBUG_CONSOLE_ADDR": console}
    with run_agent(
        f"unix://{tmp_path}/agent.sock", tmp=tmp_path, env=env, cmdline="agent.debug_console"
    ) as agent:
        wait_for_socket(f"{tmp_path}/console.sock", proc=agent.proc)
        yield agent, console


def children(agent_pid: int) -> list[str]:
    """The agent's child processes, as their command lines."""
    pids = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    found = []
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
    return found


async def test_console_runs_one_command_with_output_and_status(tmp_path: Path) -> None:
    with console_agent(tmp_path) as (agent, console):
        assert os.stat(f"{tmp_path}/console.sock").st_mode & 0o777 == 0o600
        done = ctl_console(console, "-c", "echo out; echo err >&2; exit 7")
        assert done.returncode == 7
        assert done.stdout == "out\nerr\n"
        assert ctl_console(console, "-c", "true").returncode == 0
        assert (
            ctl_console(console, "-c", "printf 'a b\\n'; cat /proc/self/stat >/dev/null").stdout
            == "a b\n"
        )
        # every session's shell is gone with its connection (wait_for_socket's too)
        deadline = time.monotonic() + 5
        while (left := children(agent.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert left == []
        async with await Client.connect(agent.address) as client:  # the agent serves on
            await client.call(
                "grpc.Health", "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse
            )


def test_a_client_leaving_a_busy_shell_is_no_error(tmp_path: Path) -> None:
    """The shell's output still in the terminal when its client has gone is dropped."""
    with console_agent(tmp_path) as (agent, _console):
        for _ in range(5):
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(f"{tmp_path}/console.sock")
                client.sendall(b"while :; do echo busy-busy-busy; done\n")
                received = b""
                while received.count(b"busy-busy-busy") < 50:
                    received += client.recv(65536)
        assert agent.stop() == 0
    assert agent.proc.stderr is not None
    assert "Traceback" not in agent.proc.stderr.read()


def read_until(fd: int, wanted: bytes, timeout: float = 15) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 1)[0]:
            seen += os.read(fd, 4096)
    return seen


def test_console_interactive_through_a_terminal(tmp_path: Path) -> None:
    with console_agent(tmp_path) as (_agent, console):
        fd, terminal = pty.openpty()
        ctl = subprocess.Popen(
            [*CTL, "console", console], stdin=terminal, stdout=terminal, stderr=terminal
        )
        os.close(terminal)
        try:
            seen = read_until(fd, b"# ")  # the prompt: a shell types ahead of nobody
            os.write(fd, b"echo $((6*7))-is-the-answer\n")
            seen += read_until(fd, b"42-is-the-answer")
            os.write(fd, b"exit 3\n")
            status = ctl.wait(15)
        finally:
            ctl.kill()
            os.close(fd)
    assert b"42-is-the-answer" in seen
    assert status == 0


def test_console_reads_a_pipe_to_its_end(tmp_path: Path) -> None:
    with console_agent(tmp_path) as (_agent, console):
        done = subprocess.run(
            [*CTL, "console", console],
            input="echo piped-$((1+1))\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 0 and done.stdout == "piped-2\n"


def test_piped_input_prints_only_its_output_and_ends_with_its_status(tmp_path: Path) -> None:
    script = "echo one\nprintf 'two, no newline'\necho three >&2\nread x; echo read:$?\nexit 4\n"
    with console_agent(tmp_path) as (_agent, console):
        done = subprocess.run(
            [*CTL, "console", console], input=script, capture_output=True, text=True, timeout=30
        )
        empty = subprocess.run(
            [*CTL, "console", console], input="", capture_output=True, text=True, timeout=30
        )
    # no prompt, no echo of the input, nothing of the shell's own; `read` gets end of input
    assert done.stdout == "one\ntwo, no newlinethree\nread:1\n"
    assert done.returncode == 4 and done.stderr == ""
    assert empty.returncode == 0 and empty.stdout == ""


def test_console_has_the_terminals_size_and_follows_resizes(tmp_path: Path) -> None:
    with console_agent(tmp_path) as (_agent, console):
        term = Terminal([*CTL, "console", console], tmp_path, rows=31, cols=97)
        try:
            term.expect("# ")
            term.type("stty size\n")
            term.expect(r"\b31 97\r\n")
            term.resize(45, 132)
            time.sleep(0.5)  # the new size travels to the agent; then ask again
            term.type("stty size; echo $COLUMNS\n")
            term.expect(r"\b45 132\r\n")
            term.type("exit\n")
            assert term.wait() == 0
        finally:
            term.close()
        # a one-command run gets the size of the terminal it prints to
        sized = Terminal(
            [*CTL, "console", console, "-c", "stty size </dev/tty"], tmp_path, rows=20, cols=70
        )
        try:
            sized.expect(r"20 70\r\n")
            assert sized.wait() == 0
        finally:
            sized.close()


def test_console_is_off_unless_asked(tmp_path: Path) -> None:
    env = {"KATA_AGENT_DEBUG_CONSOLE_ADDR": f"unix://{tmp_path}/console.sock"}
    with run_agent(f"unix://{tmp_path}/agent.sock", tmp=tmp_path, env=env) as agent:
        time.sleep(0.3)
        assert not Path(f"{tmp_path}/console.sock").exists()
        assert agent.stop() == 0
    assert any("agent.debug_console is off" in str(line["msg"]) for line in agent.log_lines())


def test_log_port_serves_the_log_lines(tmp_path: Path) -> None:
    env = {"KATA_AGENT_LOG_ADDR": f"unix://{tmp_path}/log.sock", "KATA_AGENT_LOG_LEVEL": "debug"}
    with run_agent(f"unix://{tmp_path}/agent.sock", tmp=tmp_path, env=env) as agent:
        wait_for_socket(f"{tmp_path}/log.sock", proc=agent.proc)
        reader = socket.socket(socket.AF_UNIX)
        reader.connect(f"{tmp_path}/log.sock")
        time.sleep(0.2)  # the agent has taken the reader on
        ctl = subprocess.run(
            [*CTL, "connect", "--server-address", agent.address, "-c", "Check"],
            capture_output=True,
            timeout=30,
        )
        assert ctl.returncode == 0
        agent.stop()
        received = b""
        reader.settimeout(10)
        while chunk := reader.recv(65536):
            received += chunk
        reader.close()
    lines = [json.loads(line) for line in received.decode().splitlines()]
    assert {"shutting down", "agent stopped"} <= {line["msg"] for line in lines}
    assert any(line.get("call") == "grpc.Health/Check" for line in lines)
    assert all(line["name"] == "kata-agent" for line in lines)


@pytest.mark.parametrize("option", ["agent.debug_console agent.debug_console_vport=1026"])
def test_console_vsock_port_is_bound(tmp_path: Path, option: str) -> None:
    """A guest's console listens on VSOCK: here it can bind (no peer to test with)."""
    with run_agent(f"unix://{tmp_path}/agent.sock", tmp=tmp_path, cmdline=option) as agent:
        time.sleep(0.3)
        assert agent.proc.poll() is None
        assert agent.stop() == 0
    listening = [
        line for line in agent.log_lines() if "debug console listening" in str(line["msg"])
    ]
    assert listening and listening[0]["address"] == "vsock://-1:1026"


@contextlib.contextmanager
def console_without_resizes(path: Path) -> Iterator[str]:
    """A console as upstream's agent serves one (src/agent/src/console.rs): a shell on a
    pty, bytes both ways, no announcement. A stand-in: upstream's agent cannot run here."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        master, slave = pty.openpty()
        shell = subprocess.Popen(
            ["setsid", "--ctty", "/bin/bash", "--norc", "-i"],
            stdin=slave, stdout=slave, stderr=slave, env={"PS1": "$ ", "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        os.close(slave)
        with conn:
            while shell.poll() is None:
                ready = select.select([conn, master], [], [], 0.2)[0]
                try:
                    if conn in ready:
                        data = conn.recv(4096)
                        if not data:
                            break
                        os.write(master, data)
                    if master in ready:
                        conn.sendall(os.read(master, 4096))
                except OSError:
                    break
        shell.kill()
        shell.wait()
        os.close(master)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"unix://{path}"
    finally:
        server.close()


def test_no_resize_request_goes_to_a_console_that_did_not_announce_it(tmp_path: Path) -> None:
    """Upstream's console passes every byte to the shell: a resize request would be
    typed keys there (bash: a syntax error on the first line)."""
    with console_without_resizes(tmp_path / "c.sock") as address:
        term = Terminal([*CTL, "console", address], tmp_path, rows=31, cols=97)
        try:
            term.expect(r"\$ ")
            term.resize(40, 100)
            time.sleep(0.3)
            term.type("echo $((6*7))-answered\n")
            term.expect("42-answered")
            term.type("exit\n")
            assert term.wait() == 0
        finally:
            term.close()
    assert b"syntax error" not in term.transcript and b";31;97t" not in term.transcript
