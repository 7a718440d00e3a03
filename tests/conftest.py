"""Shared fixtures: paths, a real kata-agent process, the Go ttRPC peer."""

from __future__ import annotations

import asyncio
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

import pytest

from pykata.ttrpc import Client

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
REFERENCE_DESCRIPTORS = SHARED / "reference" / "kata-agent-api.binpb"
GO_PEER_SRC = ROOT / "tests" / "go" / "ttrpcpeer"
GO_PEER_BIN = ROOT / "tests" / "go" / "bin" / "ttrpcpeer"
AGENT = [sys.executable, "-m", "pykata.agent.cli"]


def wait_for_socket(
    path: str, timeout: float = 10.0, proc: subprocess.Popen[str] | None = None
) -> None:
    """Readiness by retry: until something accepts connections on `path`."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {path}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.connect(path)
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on {path} after {timeout}s")
        time.sleep(0.02)


class AgentProcess:
    """A kata-agent subprocess; stderr (its JSON log) is kept for inspection."""

    def __init__(self, proc: subprocess.Popen[str], address: str, socket_path: str | None) -> None:
        self.proc = proc
        self.address = address
        self.socket_path = socket_path
        self._log: list[str] = []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def log_lines(self) -> list[dict[str, object]]:
        """Parsed log lines; only call after the process has exited."""
        assert self.proc.poll() is not None, "stop the agent before reading its whole log"
        if not self._log and self.proc.stderr is not None:
            self._log = self.proc.stderr.read().splitlines()
        return [json.loads(line) for line in self._log if line.startswith("{")]


@contextlib.contextmanager
def run_agent(
    address: str,
    *,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    cmdline: str = "",
    tmp: Path,
) -> Iterator[AgentProcess]:
    cmdline_file = tmp / "cmdline"
    cmdline_file.write_text(cmdline)
    full_env = {**os.environ, "KATA_AGENT_SERVER_ADDR": address, **(env or {})}
    proc = subprocess.Popen(
        [*AGENT, "--kernel-cmdline", str(cmdline_file), *args],
        env=full_env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    socket_path = address.removeprefix("unix://") if address.startswith("unix:///") else None
    agent = AgentProcess(proc, address, socket_path)
    try:
        if socket_path:
            wait_for_socket(socket_path, proc=proc)
        yield agent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    with run_agent(f"unix://{tmp_path}/agent.sock", tmp=tmp_path) as running:
        yield running


def build_go_peer() -> Path:
    sources = list(GO_PEER_SRC.glob("*.go"))
    if GO_PEER_BIN.exists() and all(
        GO_PEER_BIN.stat().st_mtime >= s.stat().st_mtime for s in sources
    ):
        return GO_PEER_BIN
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": "/usr/share/gocode",
        "GOCACHE": str(ROOT / "tests" / "go" / "bin" / ".cache"),
        "GOFLAGS": "",
    }
    GO_PEER_BIN.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["go", "build", "-o", str(GO_PEER_BIN), "."], cwd=GO_PEER_SRC, env=env, check=True
    )
    return GO_PEER_BIN


@pytest.fixture(scope="session")
def go_peer() -> Path:
    return build_go_peer()


async def call_with_server_deadline(
    client: Client, service: str, method: str, payload: bytes, timeout_nano: int, wait: float = 3
) -> bytes:
    """Send a deadline but wait longer locally, so the status seen is the server's own."""
    sid, frame = client._protocol.request(service, method, payload, timeout_nano=timeout_nano)
    future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    client._pending[sid] = future
    client._write(frame)
    return await asyncio.wait_for(future, wait)
