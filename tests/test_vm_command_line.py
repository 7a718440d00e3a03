"""What QEMU and the guest kernel are told, per channel.

The vsock channel cannot run here (no /dev/vhost-vsock on these hosts), so
its QEMU and kernel command lines are checked as text: this is the only
test of that path. The serial channel runs for real in tests/test_vm.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pykata.vm.image import GuestImage
from pykata.vm.qemu import Channel, VmError, VmOptions, qemu_command

RUN = Path("/run/test-vm")


def options(**given: object) -> VmOptions:
    return VmOptions(image=GuestImage(Path("/images/x")), **given)  # type: ignore[arg-type]


def appended(command: list[str]) -> str:
    return command[command.index("-append") + 1]


def test_vsock_gives_the_guest_a_vhost_vsock_device_and_the_agent_its_defaults() -> None:
    channel = Channel("vsock", cid=1234)
    command = qemu_command(options(debug_console=True), RUN, "tcg", channel)
    assert "vhost-vsock-pci,guest-cid=1234" in command
    assert not any("virtserialport" in arg for arg in command)
    assert "agent.server_addr" not in appended(command)  # vsock://-1:1024, the default
    assert "agent.debug_console agent.debug_console_vport=1026" in appended(command)
    assert channel.agent_address(RUN) == "vsock://1234:1024"
    assert channel.console_address(RUN) == "vsock://1234:1026"


def test_vsock_refuses_a_trace_socket_and_says_what_to_do() -> None:
    with pytest.raises(VmError, match="vsock port 10240"):
        qemu_command(options(trace_socket="/tmp/f.sock"), RUN, "tcg", Channel("vsock", 7))


def test_serial_ports_carry_agent_spans_and_console() -> None:
    channel = Channel("serial")
    command = qemu_command(
        options(trace_socket="/tmp/f.sock", debug_console=True, kernel_params="maxcpus=1"),
        RUN, "tcg", channel,
    )  # fmt: skip
    line = appended(command)
    assert "agent.server_addr=serial://agent.channel.0" in line
    assert "agent.trace agent.trace_addr=serial://trace.channel.0" in line
    assert "agent.debug_console_addr=serial://console.channel.0" in line
    assert line.endswith(" maxcpus=1")
    assert "socket,id=trace.channel.0,path=/tmp/f.sock,reconnect=1" in command
    # QEMU listens on the port's socket; clients use the relay's, agent.sock.
    assert f"socket,id=agent.channel.0,path={RUN}/agent-port.sock,server=on,wait=off" in command
    assert channel.agent_address(RUN) == f"unix://{RUN}/agent.sock"


def test_auto_picks_vsock_only_where_the_host_has_vhost_vsock() -> None:
    expected = "vsock" if os.access("/dev/vhost-vsock", os.R_OK | os.W_OK) else "serial"
    assert Channel.choose("auto").kind == expected
    assert 3 <= Channel.choose("vsock").cid < 0xFFFF_FFFF
    with pytest.raises(VmError, match="unknown channel 'pci'"):
        Channel.choose("pci")
