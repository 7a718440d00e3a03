"""What a snapshot's guests are told, and what making one refuses (no QEMU runs here:
tests/test_vm_snapshot.py makes and restores real ones)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pykata.vm import snapshot
from pykata.vm.cmdline import SavedMachine, qemu_command
from pykata.vm.image import GuestImage
from pykata.vm.qemu import Channel, VmError, VmOptions

RUN = Path("/run/test-vm")
SNAP = Path("/snap")


def options(**given: object) -> VmOptions:
    return VmOptions(image=GuestImage(Path("/images/x")), **given)  # type: ignore[arg-type]


def saved(shared: bool, incoming: bool) -> SavedMachine:
    state = SNAP / "state" if incoming else None
    stub = SNAP / "kernel-header" if incoming else None
    return SavedMachine(
        SNAP / "memory", shared, SNAP / "disk.img", not incoming, RUN / "r.sock", state, stub
    )


def test_a_restored_guest_maps_the_memory_copy_on_write_and_waits_for_its_state() -> None:
    command = qemu_command(options(), RUN, "tcg", Channel("serial"), saved(False, True))
    assert "memory-backend-file,id=mem,size=512M,mem-path=/snap/memory,share=off" in command
    assert "pc,accel=tcg,memory-backend=mem" in command
    assert command[command.index("-incoming") + 1] == "defer"
    # The snapshot's disk copy stays as made: the guest writes a temporary overlay.
    assert "file=/snap/disk.img,format=raw,if=virtio,snapshot=on" in command
    assert "virtserialport,chardev=restore.channel.0,name=restore.channel.0" in command
    assert "agent.restore_addr=serial://restore.channel.0" in command[command.index("-append") + 1]


def test_a_restored_guest_gets_the_kernels_header_alone_and_no_initrd(tmp_path: Path) -> None:
    """QEMU would keep the kernel and the initrd in its memory (16 MB) for a boot that a
    restored guest never does again; the real-mode header sets up the same machine."""
    command = qemu_command(options(), RUN, "tcg", Channel("serial"), saved(False, True))
    assert command[command.index("-kernel") + 1] == "/snap/kernel-header"
    assert "-initrd" not in command
    booting = qemu_command(options(), RUN, "tcg", Channel("serial"), saved(False, False))
    assert booting[booting.index("-kernel") + 1] == "/images/x/vmlinuz"
    assert booting[booting.index("-initrd") + 1] == "/images/x/initramfs.cpio"
    # A bzImage: boot sector, 0x1f1 = setup sectors (0 means 4), then the kernel proper.
    for setup_sects, setup_bytes in ((3, 4 * 512), (0, 5 * 512)):
        kernel = bytearray(range(256)) * 40 + bytearray(1 << 20)
        kernel[snapshot.SETUP_SECTS_OFFSET] = setup_sects
        (tmp_path / "vmlinuz").write_bytes(kernel)
        snapshot.write_kernel_stub(tmp_path / "vmlinuz", tmp_path / "stub")
        stub = (tmp_path / "stub").read_bytes()
        assert stub[:setup_bytes] == kernel[:setup_bytes]
        assert stub[setup_bytes:] == bytes(4096)
    (tmp_path / "short").write_bytes(b"MZ")
    with pytest.raises(VmError, match="not a Linux kernel image"):
        snapshot.write_kernel_stub(tmp_path / "short", tmp_path / "stub")


def test_the_guest_saved_writes_its_memory_file_and_disk_copy() -> None:
    command = qemu_command(options(), RUN, "tcg", Channel("serial"), saved(True, False))
    assert "memory-backend-file,id=mem,size=512M,mem-path=/snap/memory,share=on" in command
    assert "file=/snap/disk.img,format=raw,if=virtio" in command
    assert "-incoming" not in command


def test_a_booted_guest_is_not_told_to_park() -> None:
    command = qemu_command(options(), RUN, "tcg", Channel("serial"))
    assert "restore_addr" not in command[command.index("-append") + 1]
    assert not any("restore.channel.0" in arg for arg in command)


def test_a_restored_guest_with_a_shared_directory_gets_the_device_later(tmp_path: Path) -> None:
    command = qemu_command(
        options(shared_dir=tmp_path), RUN, "tcg", Channel("serial"), saved(True, True)
    )
    assert not any("vhost-user-fs" in arg for arg in command)  # hotplugged after the restore
    assert not any("memory-backend-memfd" in arg for arg in command)


def test_snapshots_refuse_the_kata_layout_and_vsock() -> None:
    with pytest.raises(VmError, match="pykata layout"):
        snapshot.ensure(options(layout="kata-initrd"), SNAP)
    with pytest.raises(VmError, match="serial channel"):
        qemu_command(options(), RUN, "tcg", Channel("vsock", 5), saved(False, True))


def test_making_a_snapshot_never_replaces_a_directory_that_holds_something_else(
    tmp_path: Path,
) -> None:
    (tmp_path / "notes.txt").write_text("mine\n")
    with pytest.raises(VmError, match="not empty and holds no snapshot"):
        snapshot.make(options(channel="serial"), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


def test_a_first_restore_with_a_shared_directory_makes_the_snapshot_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `connect --from-snapshot DIR --bundle-dir B` with no snapshot in DIR yet: the guest
    # is saved without the share (it is hotplugged at each restore), not refused.
    made: list[VmOptions] = []

    def make(given: VmOptions, directory: Path) -> snapshot.Snapshot:
        made.append(given)  # stands in for the boot: tests/test_vm_snapshot.py boots
        return snapshot.Snapshot(directory)

    monkeypatch.setattr(snapshot, "make", make)
    monkeypatch.setattr(snapshot, "qemu_version", lambda: "QEMU emulator version 7.2")
    snapshot.ensure(options(channel="serial", shared_dir=tmp_path / "bundle"), tmp_path / "snap")
    assert [m.shared_dir for m in made] == [None]
    assert snapshot.shape(made[0]) == snapshot.shape(options(channel="serial"))
