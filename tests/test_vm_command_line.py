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


def kata_image(tmp_path: Path) -> GuestImage:
    (tmp_path / "kata-initrd.img").write_bytes(b"")
    return GuestImage(tmp_path)


def test_kata_initrd_layout_is_the_machine_kata_makes_for_an_initrd(tmp_path: Path) -> None:
    """Kata's `initrd =` guest (kata-containers src/runtime/virtcontainers/qemu.go):
    q35, kernel and initrd with no disk, the console on virtio-serial, Kata's
    kernel command line; then the channel's parameters, then the user's."""
    options = VmOptions(
        image=kata_image(tmp_path), layout="kata-initrd", cpus=2, kernel_params="agent.log=debug"
    )
    command = qemu_command(options, RUN, "tcg", Channel("vsock", cid=99))
    assert "q35,accel=tcg" in command
    assert command[command.index("-initrd") + 1] == str(tmp_path / "kata-initrd.img")
    assert not any(arg.startswith("file=") for arg in command)  # no disk: the root is the initrd
    assert "virtconsole,chardev=charconsole0,id=console0" in command
    assert "vhost-vsock-pci,guest-cid=99" in command
    line = appended(command)
    assert line.startswith("tsc=reliable no_timer_check rcupdate.rcu_expedited=1 ")
    assert " console=hvc0 console=hvc1 quiet panic=1 nr_cpus=2 selinux=0 " in line
    assert "root=" not in line and "ttyS0" not in line
    assert line.endswith(" agent.cdh_api_timeout=50 agent.log=debug")


def test_kata_initrd_layout_shares_memory_as_kata_does(tmp_path: Path) -> None:
    options = VmOptions(image=kata_image(tmp_path), layout="kata-initrd", shared_dir=tmp_path)
    command = qemu_command(options, RUN, "tcg", Channel("serial"))
    assert "memory-backend-file,mem-path=/dev/shm,id=mem,size=512M,share=on" in command
    assert any(a.startswith("vhost-user-fs-pci,") and "tag=kataShared" in a for a in command)
    assert "agent.server_addr=serial://agent.channel.0" in appended(command)


def test_kata_initrd_layout_without_the_initrd_says_how_to_build_it() -> None:
    with pytest.raises(VmError, match="kata-guest-image --kata-initrd"):
        qemu_command(options(layout="kata-initrd"), RUN, "tcg", Channel("serial"))
    with pytest.raises(VmError, match="unknown layout 'kata'"):
        qemu_command(options(layout="kata"), RUN, "tcg", Channel("serial"))
