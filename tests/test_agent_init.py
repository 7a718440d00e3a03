"""kata-agent as PID 1 - here of a fresh PID namespace (with its own mount,
network, UTS and IPC namespaces), the closest this machine gets to a guest
without a VM (issue 8 boots a real one)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from pykata.api import agent_pb2
from pykata.ttrpc import Client, Stub

from .peers import wait_for_socket

CTL = [sys.executable, "-m", "pykata.ctl.cli"]


async def test_agent_as_pid_1(tmp_path: Path) -> None:
    (tmp_path / "cmdline").write_text("agent.debug_console")
    env = {
        **os.environ,
        "KATA_AGENT_SERVER_ADDR": f"unix://{tmp_path}/agent.sock",
        "KATA_AGENT_DEBUG_CONSOLE_ADDR": f"unix://{tmp_path}/console.sock",
        "KATA_AGENT_RUN_DIR": str(tmp_path / "run"),
    }
    init = subprocess.Popen(
        [
            *("unshare", "--pid", "--fork", "--mount", "--net", "--uts", "--ipc"),
            *("--propagation", "private"),
            *(sys.executable, "-m", "pykata.agent.cli", "--kernel-cmdline", f"{tmp_path}/cmdline"),
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_socket(f"{tmp_path}/agent.sock", proc=init)
        async with await Client.connect(f"unix://{tmp_path}/agent.sock") as client:
            api = Stub(client, agent_pb2.DESCRIPTOR.services_by_name["AgentService"])
            details = await api.GetGuestDetails(agent_pb2.GuestDetailsRequest())
            assert details.agent_details.init_daemon
        wait_for_socket(f"{tmp_path}/console.sock", proc=init)
        # its own /proc: PID 1 there is the agent itself, not the host's init
        pid1 = subprocess.run(
            [*CTL, "console", f"unix://{tmp_path}/console.sock", "-c", "cat /proc/1/cmdline"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "pykata.agent.cli" in pid1.stdout
        # SIGTERM to the agent itself (unshare would not pass it on)
        (agent_pid,) = Path(f"/proc/{init.pid}/task/{init.pid}/children").read_text().split()
        os.kill(int(agent_pid), signal.SIGTERM)
        status = init.wait(30)
    finally:
        if init.poll() is None:
            init.kill()
    # it powered off - which ends a PID namespace as if its init got SIGINT -
    # rather than exiting
    assert status == -signal.SIGINT, init.stderr.read() if init.stderr else ""
    log = init.stderr.read() if init.stderr else ""
    assert '"msg": "powering off"' in log and '"pid": "1"' in log
