"""kata-agent-ctl's `run` as a docker, podman or crun user expects it, driven as a
user drives it (a subprocess, or a pseudo-terminal as its controlling terminal)
against a real agent running real containers."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import AgentProcess, run_container_agent
from .containers import template
from .terminal import Terminal

CTL = [sys.executable, "-m", "pykata.ctl.cli"]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    with run_container_agent(tmp_path) as running:
        yield running


def run(
    agent: AgentProcess,
    rootfs: Path,
    *commands: str,
    options: tuple[str, ...] = (),
    stdin: bytes | None = None,
    merged: bool = False,
) -> subprocess.CompletedProcess[bytes]:
    """kata-agent-ctl connect ... -c COMMAND ..., stdin /dev/null unless given."""
    args = [*CTL, "connect", "--server-address", agent.address, "--bundle-dir", str(rootfs)]
    for command in commands:
        args += ["-c", command]
    return subprocess.run(
        [*args, *options],
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merged else subprocess.PIPE,
        timeout=120,
    )


def containers_left(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "run" / "containers").glob("*"))


def running_container(tmp_path: Path) -> str:
    """The container a run made, once the agent has it, and its process has started."""
    deadline = time.monotonic() + 60
    while not (found := containers_left(tmp_path)):
        assert time.monotonic() < deadline, "no container was created"
        time.sleep(0.05)
    time.sleep(0.5)  # created; now started too
    return found[0]


def terminal(agent: AgentProcess, rootfs: Path, home: Path, *args: str, **kw: int) -> Terminal:
    return Terminal(
        [*CTL, "connect", "--server-address", agent.address, "--bundle-dir", str(rootfs), *args],
        home,
        **kw,
    )


# --- 1. the exit status ------------------------------------------------------------


def test_run_exits_with_the_container_status_and_the_trailer_is_on_stderr(
    agent: AgentProcess, rootfs: Path
) -> None:
    done = run(agent, rootfs, "run /bin/sh -c 'printf no-newline; exit 3'")
    assert done.returncode == 3
    assert done.stdout == b"no-newline"  # the program's bytes, nothing glued on
    assert done.stderr == b"exit code 3\n"
    # stdout and stderr the same file (2>&1): the trailer starts a line of its own
    merged = run(agent, rootfs, "run /bin/sh -c 'printf no-newline'", merged=True)
    assert merged.returncode == 0 and merged.stdout == b"no-newline\nexit code 0\n"
    # a failed run stops the run of commands there, as the first failure does
    both = run(agent, rootfs, "run /bin/false", "echo not-reached")
    assert both.returncode == 1 and b"not-reached" not in both.stdout


def test_run_killed_by_a_signal_exits_128_plus_n_also_in_json(
    agent: AgentProcess, rootfs: Path, tmp_path: Path
) -> None:
    args = [*CTL, "connect", "--server-address", agent.address, "--bundle-dir", str(rootfs)]
    runner = subprocess.Popen(
        [*args, "--output", "json", "-c", "run /bin/sleep 60"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        cid = running_container(tmp_path)
        # another client kills it, as `docker kill` would
        killer = subprocess.run(
            [*args, "-c", f"SignalProcess container_id={cid} exec_id= signal=SIGKILL"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
        )
        assert killer.returncode == 0, killer.stdout + killer.stderr
        out, err = runner.communicate(timeout=60)
    finally:
        runner.kill()
    assert runner.returncode == 128 + signal.SIGKILL, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[-1] == {
        "command": "run",
        "status": "OK",
        "response": {"container_id": cid, "exit_code": 137},
    }
    assert err == b""  # JSON mode: no trailer
    assert containers_left(tmp_path) == []


# --- 2. bytes, in order -----------------------------------------------------------


def test_run_output_is_the_bytes_written_in_the_order_written(
    agent: AgentProcess, rootfs: Path
) -> None:
    archive = run(agent, rootfs, "run /bin/tar -c -C / bin/busybox etc")
    assert archive.returncode == 0, archive.stderr
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        member = tar.extractfile("bin/busybox")
        assert member is not None
        assert member.read() == (rootfs / "bin" / "busybox").read_bytes()
        assert "etc/passwd" in tar.getnames()
    binary = run(agent, rootfs, r"run /usr/bin/printf '\377\000\376\r\n'")
    assert binary.stdout == b"\xff\x00\xfe\r\n"
    # stdout and stderr read at once: interleaved as the process wrote them (the
    # sleeps order the writes; no time is measured)
    script = "echo o1; sleep 0.5; echo e1 >&2; sleep 0.5; echo o2; sleep 0.5; echo e2 >&2"
    mixed = run(agent, rootfs, f"run /bin/sh -c '{script}'", merged=True)
    assert mixed.stdout == b"o1\ne1\no2\ne2\nexit code 0\n"


def test_a_reader_that_goes_away_ends_the_process_as_sigpipe_would(
    agent: AgentProcess, rootfs: Path, tmp_path: Path
) -> None:
    command = [*CTL, "connect", "--server-address", agent.address, "--bundle-dir", str(rootfs),
               "-c", "run /bin/sh -c 'while :; do echo y; done'"]  # fmt: skip
    piped = subprocess.run(
        ["bash", "-c", '"$@" </dev/null | head -c 4; echo " ${PIPESTATUS[0]}"', "-", *command],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert piped.stdout == "y\ny\n 141\n", piped.stderr  # 128 + SIGPIPE
    assert "Traceback" not in piped.stderr and containers_left(tmp_path) == []


def test_terminal_output_is_untouched_and_never_reaches_the_prompt(
    agent: AgentProcess, rootfs: Path, tmp_path: Path
) -> None:
    term = terminal(agent, rootfs, tmp_path, "--interactive")
    try:
        term.expect("kata-agent-ctl> ")
        # the remote terminal makes \n \r\n; ours must not make it \r\r\n
        term.type("run -t /usr/bin/printf 'a\\nb\\n'\n")
        assert term.expect(b"exit code 0").endswith(b"a\r\nb\r\nexit code 0")
        term.expect("kata-agent-ctl> ")
        # a program asks the terminal where its cursor is; the terminal's answer
        # (typed here) is not for the command line, nor anything else typed meanwhile
        term.type("run -t /bin/sh -c 'printf \"\\033[6n\"; sleep 2'\n")
        term.expect(b"\x1b\\[6n")
        term.type("\x1b[12;1R")
        term.expect("exit code 0")
        term.expect("kata-agent-ctl> ")
        term.type("Check\n")
        after = term.expect("kata-agent-ctl> ")
        assert b"SERVING" in after and b"unknown command" not in after
        term.type("quit\n")
        assert term.wait() == 0
    finally:
        term.close()


# --- 3. stdin ---------------------------------------------------------------------


def test_without_i_the_process_gets_end_of_input_at_once(
    agent: AgentProcess, rootfs: Path, tmp_path: Path
) -> None:
    term = terminal(agent, rootfs, tmp_path, "-c", "run /bin/sh -c 'cat; echo cat-done'")
    try:
        term.expect("cat-done")  # nothing typed: cat saw the end of its input
        assert term.wait() == 0
    finally:
        term.close()


def test_with_i_or_a_pipe_stdin_is_forwarded_to_its_end(
    agent: AgentProcess, rootfs: Path, tmp_path: Path
) -> None:
    data = os.urandom(3 << 20)  # many 32 KiB WriteStdin calls, in order
    piped = run(agent, rootfs, "run /usr/bin/sha256sum", stdin=data)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    closed = run(agent, rootfs, "run -i /bin/sh -c 'cat; echo end'", stdin=b"no newline")
    assert closed.stdout == b"no newlineend\n"
    # a process that stops reading early: the rest is not wanted, and that is no error
    early = run(agent, rootfs, "run -i /usr/bin/head -c 5", stdin=b"x" * (1 << 20))
    assert early.returncode == 0 and early.stdout == b"xxxxx"
    # from a terminal, with -i: typed lines, then Ctrl-D
    term = terminal(agent, rootfs, tmp_path, "-c", "run -i /bin/sh -c 'cat; echo eof-seen'")
    try:
        term.type("typed line\n")
        term.expect("typed line\r\n(.|\n)*typed line")  # the echo, then cat's copy
        term.type("\x04")
        term.expect("eof-seen")
        assert term.wait() == 0
    finally:
        term.close()


def test_t_gives_a_terminal_of_the_local_size_that_follows_resizes(
    agent: AgentProcess, rootfs: Path, tmp_path: Path
) -> None:
    term = terminal(agent, rootfs, tmp_path, "-c", "run -it /bin/sh", rows=33, cols=91)
    try:
        term.type("stty size; tty\n")  # typed ahead, before the shell is there: kept
        term.expect(r"33 91\r\n/dev/pts/\d+")
        term.resize(44, 120)
        time.sleep(0.5)  # the resize travels as a TtyWinResize call; then ask again
        term.type("stty size\n")
        term.expect(r"44 120")
        term.type("exit 4\n")
        assert term.wait() == 4
    finally:
        term.close()


def test_reading_past_the_end_of_a_stream_is_not_an_error(
    agent: AgentProcess, rootfs: Path
) -> None:
    done = run(
        agent,
        rootfs,
        "CreateContainer OCI.Process.Args=/bin/echo OCI.Process.Args=once",
        "StartContainer",
        "WaitProcess",
        "ReadStdout",
        "ReadStdout",
        "ReadStderr",
        "RemoveContainer",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert b"once\nRemoveContainer: OK" in done.stdout


# --- 4. Ctrl-C and SIGTERM --------------------------------------------------------


def test_ctrl_c_goes_to_the_process_and_twice_kills_it(
    agent: AgentProcess, rootfs: Path, tmp_path: Path
) -> None:
    term = terminal(agent, rootfs, tmp_path, "-c", "run /bin/sleep 60")
    try:
        running_container(tmp_path)
        term.type("\x03")  # sleep, PID 1 of its namespace, ignores SIGINT
        term.expect("SIGINT passed to the container; again to kill it")
        term.type("\x03")
        assert term.wait() == 130
    finally:
        term.close()
    assert b"exit code 137" in term.transcript
    assert b"Traceback" not in term.transcript
    assert containers_left(tmp_path) == []


def test_a_process_that_handles_sigint_ends_as_it_chooses(
    agent: AgentProcess, rootfs: Path, tmp_path: Path
) -> None:
    script = "trap 'echo handled; exit 4' INT; echo ready; while :; do sleep 0.1; done"
    term = terminal(agent, rootfs, tmp_path, "-c", f'run /bin/sh -c "{script}"')
    try:
        term.expect("ready")
        term.type("\x03")
        term.expect("handled")
        assert term.wait() == 130
    finally:
        term.close()
    assert b"exit code 4" in term.transcript and containers_left(tmp_path) == []


def test_sigterm_is_passed_on_and_the_container_removed(
    agent: AgentProcess, rootfs: Path, tmp_path: Path
) -> None:
    args = [*CTL, "connect", "--server-address", agent.address, "--bundle-dir", str(rootfs)]
    runner = subprocess.Popen(
        [*args, "-c", "run /bin/sleep 60"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        running_container(tmp_path)
        runner.send_signal(signal.SIGTERM)  # to init without a handler: the agent kills it
        _, err = runner.communicate(timeout=60)
    finally:
        runner.kill()
    assert runner.returncode == 128 + signal.SIGTERM, err
    assert b"Traceback" not in err and containers_left(tmp_path) == []


@pytest.mark.parametrize("moment", ["creating", 0.3, 0.45, 0.6])
def test_ctrl_c_at_any_moment_leaves_nothing_behind(
    agent: AgentProcess, rootfs: Path, tmp_path: Path, moment: str | float
) -> None:
    """Connecting, creating, starting the container or running it: Ctrl-C (and
    another half a second later, if the tool is still there) ends it all, quietly."""
    args = [*CTL, "connect", "--server-address", agent.address, "--bundle-dir", str(rootfs)]
    runner = subprocess.Popen(
        [*args, "-c", "run /bin/sleep 60"], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    if moment == "creating":  # as soon as the agent has begun to make the container
        deadline = time.monotonic() + 60
        while not containers_left(tmp_path) and runner.poll() is None:
            assert time.monotonic() < deadline, "no container was created"
            time.sleep(0.002)
    else:
        time.sleep(float(moment))
    runner.send_signal(signal.SIGINT)
    try:
        _, err = runner.communicate(timeout=0.5)
    except subprocess.TimeoutExpired:
        runner.send_signal(signal.SIGINT)
        _, err = runner.communicate(timeout=60)
    # 130; or, while the tool is still loading its modules, killed by SIGINT itself (no
    # traceback either way; a shell shows 130 for both)
    loading = () if moment == "creating" else (-signal.SIGINT,)
    assert runner.returncode in (130, *loading), err
    assert b"Traceback" not in err
    assert containers_left(tmp_path) == []


def test_ctrl_c_in_interactive_mode_returns_to_a_clean_prompt(
    agent: AgentProcess, rootfs: Path, tmp_path: Path
) -> None:
    term = terminal(agent, rootfs, tmp_path, "--interactive")
    try:
        term.expect("kata-agent-ctl> ")
        term.type("run /bin/sleep 60\n")
        running_container(tmp_path)
        term.type("\x03")
        term.expect("again to kill it")
        term.type("\x03")
        term.expect("exit code 137")
        term.expect("kata-agent-ctl> ")
        assert term.quiet_for(1.5) == b""  # no stray message at the prompt
        term.type("sleep 60\n")  # a built-in: Ctrl-C abandons it
        time.sleep(0.5)
        term.type("\x03")
        term.expect("kata-agent-ctl> ")
        term.type("Check\n")
        term.expect("SERVING")
        term.expect("kata-agent-ctl> ")
        assert term.quiet_for(1.0) == b""
        term.type("quit\n")
        term.wait()
    finally:
        term.close()
    assert b"Traceback" not in term.transcript and b"Task" not in term.transcript
    assert containers_left(tmp_path) == []


def test_ctrl_c_outside_run_exits_130_without_a_traceback(
    agent: AgentProcess, rootfs: Path, tmp_path: Path
) -> None:
    term = terminal(
        agent, rootfs, tmp_path, "-c", "Check", "-c", "sleep 60", "-c", "echo not-reached"
    )
    try:
        term.expect("SERVING")  # loaded and connected: Ctrl-C is the tool's to handle now
        term.type("\x03")
        assert term.wait() == 130
    finally:
        term.close()
    assert b"Traceback" not in term.transcript and b"not-reached" not in term.transcript


# --- 5. the bundle's own process ----------------------------------------------------


def bundle(tmp_path: Path, rootfs: Path, **process: object) -> Path:
    directory = tmp_path / "bundle"
    directory.mkdir()
    (directory / "rootfs").symlink_to(rootfs)
    config = template()  # `runc spec`: args ["sh"], a terminal
    config["process"].update(process)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_run_without_a_command_runs_the_bundles_process(
    agent: AgentProcess, rootfs: Path, tmp_path: Path
) -> None:
    echo = bundle(tmp_path, rootfs, args=["/bin/echo", "from-config"], terminal=False)
    done = run(agent, echo, "run")
    assert done.returncode == 0 and done.stdout == b"from-config\n", done.stderr


def test_run_without_a_command_uses_the_bundles_terminal(
    agent: AgentProcess, rootfs: Path, tmp_path: Path
) -> None:
    shell = bundle(tmp_path, rootfs)  # runc spec's own: sh on a terminal
    term = terminal(agent, shell, tmp_path, "-c", "run", rows=30, cols=100)
    try:
        term.type("echo $((2+3)); stty size; exit 6\n")
        term.expect(r"\r\n5\r\n30 100")
        assert term.wait() == 6
    finally:
        term.close()
