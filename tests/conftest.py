"""Shared fixtures: paths, a real kata-agent process, the Go ttRPC peer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings

from pykata.api import agent_pb2
from pykata.ttrpc import Client, Stub

from .peers import build_go_peer, wait_for_socket

if TYPE_CHECKING:
    from pykata.vm.image import GuestImage
    from pykata.vm.snapshot import Snapshot

AGENT = [sys.executable, "-m", "pykata.agent.cli"]

# Timing belongs in benchmarks: a loaded machine must not fail a property test.
settings.register_profile("pykata", deadline=None)
settings.load_profile("pykata")


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
    preexec_fn: Callable[[], None] | None = None,
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
        preexec_fn=preexec_fn,
    )
    socket_path = address.removeprefix("unix://") if address.startswith("unix:///") else None
    agent = AgentProcess(proc, address, socket_path)
    try:
        if socket_path:
            wait_for_socket(socket_path, proc=proc)
        yield agent
    finally:
        if proc.poll() is None:
            # Gracefully, so the agent removes its containers; killed only if it hangs.
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    with run_agent(f"unix://{tmp_path}/agent.sock", tmp=tmp_path) as running:
        yield running


@pytest.fixture(scope="session")
def go_peer() -> Path:
    return build_go_peer()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that asks for the Go peer is a Go test (make test-fast leaves it out)."""
    for item in items:
        if "go_peer" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.go)


async def call_with_server_deadline(
    client: Client, service: str, method: str, payload: bytes, timeout_nano: int, wait: float = 3
) -> bytes:
    """Send a deadline but wait longer locally, so the status seen is the server's own."""
    sid, frame = client._protocol.request(service, method, payload, timeout_nano=timeout_nano)
    future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    client._pending[sid] = future
    client._write(frame)
    return await asyncio.wait_for(future, wait)


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .containers import build_rootfs

    return build_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs")


@contextlib.contextmanager
def run_container_agent(tmp: Path, runtime: str = "auto", **kw: object) -> Iterator[AgentProcess]:
    env = {"KATA_AGENT_RUN_DIR": str(tmp / "run"), "KATA_AGENT_OCI_RUNTIME": runtime}
    env.update(kw.pop("env", {}))  # type: ignore[arg-type]
    with run_agent(f"unix://{tmp}/agent.sock", tmp=tmp, env=env, **kw) as agent:  # type: ignore[arg-type]
        yield agent


@pytest.fixture
def container_agent(tmp_path: Path) -> Iterator[AgentProcess]:
    """An agent able to run containers, its run dir in tmp_path/run."""
    with run_container_agent(tmp_path) as running:
        yield running


@pytest.fixture
async def api(container_agent: AgentProcess) -> AsyncIterator[Stub]:
    """A Stub for grpc.AgentService on container_agent (test modules may override)."""
    async with await Client.connect(container_agent.address) as client:
        yield Stub(client, agent_pb2.DESCRIPTOR.services_by_name["AgentService"])


# --- the guest VM (slow tests only: nothing is built unless a test asks) ---------


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    from pykata.vm.image import IMAGE_ENV, build

    built = build(quiet=True)
    # Programs the tests start (kata-agent-ctl --vm qemu) use this image, not `current`,
    # which another checkout's build may move while the tests run.
    os.environ[IMAGE_ENV] = str(built.directory)
    return built


@pytest.fixture(scope="session")
def guest_snapshot(guest_image: GuestImage) -> Snapshot:
    """The snapshot of the guest most VM tests use (tests/vmguest.py), cached with the image."""
    from pykata.vm.snapshot import ensure

    from .vmguest import guest_options

    return ensure(guest_options(guest_image))
