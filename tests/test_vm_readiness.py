"""The launcher's relay waits until QEMU listens on the agent port's socket, not just
until the socket file appears: QEMU binds (the file appears) a moment before it
listens, and a relay connecting in between was refused (a flake of the VM tests).
A real unix socket plays QEMU's side here; a `sleep` process plays QEMU's process."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata.vm import readiness
from pykata.vm.channel import Channel
from pykata.vm.errors import VmError
from pykata.vm.machine import Vm


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[Vm]:
    process = subprocess.Popen(["sleep", "60"])
    try:
        yield Vm(process, tmp_path, Channel("serial"), "tcg", "", time.monotonic())
    finally:
        process.kill()
        process.wait()


def bound_not_listening(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    return sock


def test_the_relay_connects_once_the_socket_listens(vm: Vm) -> None:
    port = bound_not_listening(vm.run_dir / "agent-port.sock")
    accepted: list[socket.socket] = []

    def listen_later() -> None:
        time.sleep(0.3)  # the file is there all along; connecting is refused until now
        port.listen()
        accepted.append(port.accept()[0])

    listener = threading.Thread(target=listen_later)
    listener.start()
    relay = readiness.start_relay(vm)
    try:
        listener.join(5)
        assert accepted, "the relay never connected"
        assert (vm.run_dir / "agent.sock").exists()  # and serves its clients
    finally:
        relay.close()
        for sock in (port, *accepted):
            sock.close()


def test_a_socket_that_never_listens_is_reported(vm: Vm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readiness, "PORT_SOCKET_SECONDS", 0.5)
    port = bound_not_listening(vm.run_dir / "agent-port.sock")
    try:
        with pytest.raises(VmError, match="cannot relay the agent's port"):
            readiness.start_relay(vm)
    finally:
        port.close()
