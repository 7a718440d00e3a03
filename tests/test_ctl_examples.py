"""Every example `kata-agent-ctl examples` prints, pasted into a shell as a user would:
the variables at the top set to this test's values, each example run in order in one
bash, on a bare busybox rootfs, against the agent the first example starts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from .peers import FakeVmm

CTL = [sys.executable, "-m", "pykata.ctl.cli"]
STATUS = re.compile(r"^::status (\d+) (\d+)$", re.MULTILINE)


def examples() -> tuple[dict[str, str], list[str]]:
    """(the variables it asks for, with its values; the examples, continued lines joined)."""
    text = subprocess.run([*CTL, "examples"], capture_output=True, text=True, check=True).stdout
    variables: dict[str, str] = {}
    commands: list[str] = []
    pending = ""
    for line in text.splitlines():
        if not line.startswith("  "):
            continue
        code = line[2:]
        var = re.fullmatch(r"(\w+)=(\S+)(\s+#.*)?", code)
        if var and not commands and not pending:
            variables[var.group(1)] = var.group(2)
            continue
        pending += code + "\n"
        if not code.endswith("\\"):
            commands.append(pending)
            pending = ""
    return variables, commands


def script(values: dict[str, str], commands: list[str]) -> str:
    """The examples as pasted, each followed by a line with its exit status."""
    lines = [f"{name}={value}" for name, value in values.items()]
    for n, command in enumerate(commands):
        lines += [command.rstrip("\n"), f'echo "::status {n} $?"']
    return "\n".join(lines) + "\n"


def test_examples_set_their_variables_first() -> None:
    variables, commands = examples()
    assert set(variables) == {"agent", "rootfs"}
    used = set(re.findall(r"\$(\w+)", "".join(commands)))
    # the others name what a real pod has: its sandbox id, its guest's CID
    assert used - set(variables) <= {"sandbox_id", "guest_cid", "PWD"}, used


async def test_every_example_works_as_pasted(tmp_path: Path, rootfs: Path) -> None:
    _, commands = examples()
    pasted = [c for c in commands if "--vm qemu" not in c]  # one guest boot: the next test
    agent = f"unix://{tmp_path}/agent.sock"
    sandbox_id = f"pykata-example-{uuid.uuid4().hex[:8]}"
    values = {"agent": agent, "rootfs": str(rootfs), "sandbox_id": sandbox_id, "guest_cid": "4"}
    # The hybrid vsock examples' VMM sockets, where Kata puts them (a fake VMM: none can
    # run here), and the agent's run directory, out of the host's /run/kata-containers.
    clh = Path(f"/run/vc/vm/{sandbox_id}/clh.sock")
    firecracker = Path(f"/run/vc/firecracker/{sandbox_id}/root/kata.hvsock")
    made = [p for p in (Path("/run/vc"), Path("/run/vc/vm"), Path("/run/vc/firecracker"))
            if not p.exists()]  # fmt: skip
    for path in (clh, firecracker):
        path.parent.mkdir(parents=True)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "KATA_AGENT_RUN_DIR": str(tmp_path / "run"),
    }
    ports = {1024: f"{tmp_path}/agent.sock"}
    try:
        async with FakeVmm(clh, ports) as clh_vmm, FakeVmm(firecracker, ports) as fc_vmm:
            shell = await asyncio.create_subprocess_exec(
                "bash", "-c", script(values, pasted),
                cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            )  # fmt: skip
            try:
                out_bytes, err_bytes = await asyncio.wait_for(shell.communicate(), 240)
            finally:
                with contextlib.suppress(ProcessLookupError):  # what an example left
                    os.killpg(shell.pid, signal.SIGKILL)
    finally:
        for top in (clh.parent, firecracker.parent.parent):
            shutil.rmtree(top, ignore_errors=True)
        for directory in reversed(made):  # only what this test made, and left empty
            with contextlib.suppress(OSError):
                directory.rmdir()
    out, err = out_bytes.decode(errors="replace"), err_bytes.decode(errors="replace")
    statuses = {int(n): int(s) for n, s in STATUS.findall(out)}
    assert sorted(statuses) == list(range(len(pasted))), out + err
    expected_to_fail = [n for n, c in enumerate(pasted) if "vsock://$guest_cid" in c]
    failed = [n for n, status in statuses.items() if status != 0]
    assert failed == expected_to_fail, (
        "\n".join(f"{pasted[n]}-> {statuses[n]}" for n in failed) + "\n" + out[-3000:] + err[-3000:]
    )
    # what they print
    assert "hello\nexit status 3" in out  # run's exit status is the container's
    assert "./passwd" in out  # tar's archive, byte for byte, read by tar -t
    assert "HELLO" in out  # stdin through a pipe
    assert "box\n" in out  # the sandbox's hostname, read with ReadStdout
    assert '"status": 137' in out  # SIGTERM by name to the container's init
    assert "line 1\nline 2\n" in out  # WriteStdin's escapes
    assert re.search(r"^kata_agent_process_cpu_seconds_total ", out, re.MULTILINE)
    assert '{"command": "run", "status": "OK", "response": {"container_id"' in out
    assert '"request": {"mem_block_size": true}' in err  # -l debug, fields as typed
    assert clh_vmm.connects == fc_vmm.connects == ["CONNECT 1024\n"]
    # QEMU's vsock: no VSOCK peer can exist on these machines; the example gets as far
    # as connecting, and says in one line that the guest is not there
    assert "kata-agent-ctl: cannot connect to vsock://4:1024" in err
    assert "Traceback" not in err


@pytest.mark.vm
def test_the_guest_vm_example_works_as_pasted(rootfs: Path) -> None:
    """Boots the guest (`make guest-image` built it), runs, powers it off."""
    _, commands = examples()
    (vm_example,) = [c for c in commands if "--vm qemu" in c]
    values = {"agent": "unix:///not/used.sock", "rootfs": str(rootfs)}
    short = tempfile.mkdtemp(prefix="pykata-ex-")  # unix socket paths are short
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "TMPDIR": short,
    }
    try:
        done = subprocess.run(
            ["bash", "-c", script(values, [vm_example])],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert "::status 0 0" in done.stdout, done.stdout + done.stderr
    assert "SERVING" in done.stdout and "Linux" in done.stdout
    assert "guest stopped: powered off" in done.stderr
