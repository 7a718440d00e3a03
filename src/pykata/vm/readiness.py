"""Waiting for a guest: its first console line, QEMU's channel socket, the agent's Check."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from pathlib import Path

from ..api import health_pb2
from ..transport import TransportError
from ..ttrpc import Client, TtrpcError
from ..ttrpc.relay import RelayThread
from .errors import VmError
from .machine import Vm

#: How long QEMU may take to make (and listen on) the agent port's socket.
PORT_SOCKET_SECONDS = 10.0


def guest_started(process: subprocess.Popen[bytes], log: Path, timeout: float, sign: bytes) -> bool:
    """Did `sign` appear on the guest's console within `timeout`?"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError):
            if sign in log.read_bytes():
                return True
        time.sleep(0.1)
    return False


async def _check(vm: Vm, timeout: float) -> None:
    """One Check over one connection; for vsock, connecting again until the agent listens."""
    socket_path = vm.run_dir / "agent.sock"
    while vm.channel.kind == "serial" and not socket_path.exists():
        await asyncio.sleep(0.02)  # QEMU makes it a moment after it starts
    while True:
        try:
            client = await Client.connect(vm.agent_address, timeout=timeout)
            break
        except TransportError:
            if vm.channel.kind == "serial":
                raise
            await asyncio.sleep(0.1)  # vsock: refused until the guest's agent listens
    try:
        await client.call(
            "grpc.Health", "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse,
            timeout=timeout,
        )  # fmt: skip
    finally:
        await client.close()


def wait_for_agent(vm: Vm, timeout: float) -> None:
    """Until the agent answers Check; VmError (with the console's last lines) if it does not.

    One connection and one Check: QEMU holds the request until the guest opens the
    port, so there is nothing to retry - only QEMU's death to watch for.
    """

    async def watch() -> None:
        check = asyncio.ensure_future(_check(vm, timeout))
        while not check.done() and vm.process.poll() is None:
            await asyncio.wait({check}, timeout=0.2)
        if not check.done():
            check.cancel()
        await check

    try:
        asyncio.run(asyncio.wait_for(watch(), timeout))
    except (TtrpcError, TransportError, TimeoutError, asyncio.CancelledError) as exc:
        with contextlib.suppress(subprocess.TimeoutExpired):
            vm.process.wait(2)  # a lost connection is most often QEMU going away
        if vm.process.returncode is not None:
            raise VmError(
                f"QEMU exited ({vm.process.returncode}) before the agent answered"
                f"{vm.stderr_tail()}\nguest console:\n{vm.console_tail()}"
            ) from None
        raise VmError(
            f"the agent did not answer Check within {timeout:.0f}s ({exc})\n"
            f"guest console:\n{vm.console_tail()}"
        ) from exc
    vm.ready_after = time.monotonic() - vm.launched_at


def start_relay(vm: Vm) -> RelayThread:
    """The relay in front of QEMU's socket for the agent's port, once QEMU listens on it.

    QEMU binds the socket (the file appears) a moment before it listens, so a
    connection refused in between is tried again, not taken as failure.
    """
    port = vm.run_dir / "agent-port.sock"
    deadline = time.monotonic() + PORT_SOCKET_SECONDS
    while True:
        failure: BaseException | None = None
        if port.exists():
            try:
                return RelayThread(f"unix://{port}", vm.agent_address)
            except (TransportError, OSError) as exc:
                failure = exc
        if vm.process.poll() is not None:
            raise VmError(f"QEMU exited ({vm.process.returncode}){vm.stderr_tail()}")
        if time.monotonic() > deadline:
            if failure is not None:
                raise VmError(f"cannot relay the agent's port: {failure}") from failure
            raise VmError(f"QEMU did not make {port}{vm.stderr_tail()}")
        time.sleep(0.02)
