"""The QEMU command line and the guest kernel's, for each layout.

"pykata" boots our initramfs and root disk on QEMU's `pc` machine;
"kata-initrd" boots the image's Kata initrd the way Kata's runtime boots an
initrd (q35, no disk, the console on virtio-serial hvc0, Kata's kernel
command line), so what a Kata user would run can be tried without Kata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import SHARE_TAG
from .channel import RESTORE_PORT, Channel, port, server_socket
from .errors import VmError
from .machine import VmOptions

QEMU = "qemu-system-x86_64"
LAYOUTS = ("pykata", "kata-initrd")

#: The kernel command line Kata's Go runtime gives an initrd guest on x86_64 with
#: configuration-qemu.toml's defaults (not debugging), before the channel's and the
#: user's parameters: kata-containers src/runtime/virtcontainers/qemu_amd64.go
#: (kernelParams), qemu_arch_base.go (appendConsole, kernelParamsNonDebug), qemu.go
#: (kernelParameters), pkg/katautils/config.go (scsi_mod.scan, the agent's).
KATA_KERNEL_PARAMS = (
    "tsc=reliable", "no_timer_check", "rcupdate.rcu_expedited=1", "i8042.direct=1",
    "i8042.dumbkbd=1", "i8042.nopnp=1", "i8042.noaux=1", "noreplace-smp", "reboot=k",
    "cryptomgr.notests", "net.ifnames=0", "pci=lastbus=0",
    "console=hvc0", "console=hvc1", "quiet", "panic=1",
)  # fmt: skip
#: Parameters that follow nr_cpus: SELinux off (disable_guest_selinux), virtio-scsi's
#: scan mode (block_device_driver), the agent's cdh_api_timeout.
KATA_KERNEL_PARAMS_AFTER = ("selinux=0", "scsi_mod.scan=none", "agent.cdh_api_timeout=50")


@dataclass(frozen=True)
class SavedMachine:
    """A guest whose RAM lives in a file and whose disk writes go to a disk of its own: the
    one a snapshot is made of, or one restored from a snapshot (vm/snapshot.py)."""

    memory: Path
    #: share=on: the guest writes the file itself (the snapshot's boot, or a private copy);
    #: share=off: the file is mapped copy-on-write, so many guests share its pages.
    shared_memory: bool
    #: A copy of the image's root disk, holding what the snapshot's boot wrote.
    disk: Path
    #: The snapshot's boot writes `disk`; a restored guest writes a temporary overlay on it.
    disk_writable: bool
    #: The host side of the agent's restore port (agent/restore.py).
    restore_socket: Path
    #: The device state to restore from; None boots the guest (to make a snapshot).
    incoming: Path | None = None
    #: For a restore: the kernel's header alone (vm/snapshot.py, kernel_stub), given
    #: instead of the kernel, and no initrd.
    kernel_stub: Path | None = None


def kernel_command_line(options: VmOptions, channel: Channel, restorable: bool = False) -> str:
    if options.layout == "kata-initrd":
        params = [*KATA_KERNEL_PARAMS, f"nr_cpus={options.cpus}", *KATA_KERNEL_PARAMS_AFTER]
    else:
        params = ["console=ttyS0", "panic=-1", "quiet"]
    params += channel.kernel_params(options)
    if restorable:  # the agent parks before serving, for the snapshot (agent/restore.py)
        params.append(f"agent.restore_addr=serial://{RESTORE_PORT}")
    if options.kernel_params:
        params.append(options.kernel_params)
    return " ".join(params)


def _root_drive(options: VmOptions, saved: SavedMachine | None) -> str:
    # snapshot=on: the guest's writes go to a temporary overlay; the image stays as built.
    if saved is None:
        return f"file={options.image.root_disk},format=raw,if=virtio,snapshot=on"
    overlay = "" if saved.disk_writable else ",snapshot=on"
    return f"file={saved.disk},format=raw,if=virtio{overlay}"


def _pykata_machine(
    options: VmOptions, run_dir: Path, accel: str, saved: SavedMachine | None = None
) -> list[str]:
    """Our layout: the `pc` machine, our initramfs, the root disk (a snapshot), ttyS0."""
    image = options.image
    memory = ",memory-backend=mem" if saved else ""
    # QEMU keeps the kernel and the initrd in its own memory for the firmware to load
    # (fw_cfg): 16 MB per guest. A restored guest booted long ago and never reads them
    # again, so it gets the kernel's header alone - the same machine, the same option
    # ROM - and no initrd.
    if saved is not None and saved.kernel_stub is not None:
        boot = ["-kernel", str(saved.kernel_stub)]
    else:
        boot = ["-kernel", str(image.kernel), "-initrd", str(image.initramfs)]
    return [
        "-machine", f"pc,accel={accel}{memory}",
        "-cpu", "max" if accel == "tcg" else "host",
        "-m", str(options.memory_mib),
        "-smp", str(options.cpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        *boot,
        "-drive", _root_drive(options, saved),
        "-serial", f"file:{run_dir / 'console.log'}",
    ]  # fmt: skip


def _kata_initrd_machine(options: VmOptions, run_dir: Path, accel: str) -> list[str]:
    """The machine Kata's runtime makes for an initrd guest (kata-containers
    src/runtime/virtcontainers/qemu.go buildDevices, pkg/govmm/qemu/qemu.go): q35,
    a PCI bridge, the console on a virtio-serial port (hvc0), virtio-scsi and
    virtio-rng, the kernel and the initrd, no disk. Kata's console is a socket; here
    it is the file console.log. Kata's vsock device is the channel's business.
    """
    image = options.image
    if not image.kata_initrd.exists():
        raise VmError(
            f"{image.kata_initrd} is missing: build it with `kata-guest-image --kata-initrd`"
        )
    cpus = options.cpus
    return [
        "-machine", f"q35,accel={accel}",
        "-cpu", "max" if accel == "tcg" else "host,pmu=off",
        "-m", f"{options.memory_mib}M",
        "-smp", f"{cpus},cores=1,threads=1,sockets={cpus},maxcpus={cpus}",
        "-nodefaults", "-no-user-config", "-nographic", "--no-reboot", "-vga", "none",
        "-rtc", "base=utc,driftfix=slew,clock=host",
        "-device", "pci-bridge,bus=pcie.0,id=pci-bridge-0,chassis_nr=1,shpc=off,addr=2,"
                   "io-reserve=4k,mem-reserve=1m,pref64-reserve=1m",
        "-device", "virtio-serial-pci,disable-modern=false,id=serial0,max_ports=2",
        "-device", "virtconsole,chardev=charconsole0,id=console0",
        "-chardev", f"file,id=charconsole0,path={run_dir / 'console.log'}",
        "-device", "virtio-scsi-pci,id=scsi0,disable-modern=false",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=rng0",
        "-kernel", str(image.kernel),
        "-initrd", str(image.kata_initrd),
    ]  # fmt: skip


def _saved_machine_args(options: VmOptions, saved: SavedMachine) -> list[str]:
    """RAM from a file, the restore port, and the migration that saves or restores it.

    With the migration capability x-ignore-shared (set over QMP on both sides) a
    shared (share=on) RAM block is left out of the migration stream - the file is
    the snapshot's memory - and the restoring QEMU keeps what it mapped from the file.
    """
    share = "on" if saved.shared_memory else "off"
    args = [
        "-object", f"memory-backend-file,id=mem,size={options.memory_mib}M,"
                   f"mem-path={saved.memory},share={share}",
        *port(RESTORE_PORT, server_socket(RESTORE_PORT, saved.restore_socket)),
    ]  # fmt: skip
    if saved.incoming is not None:  # loaded once x-ignore-shared is set (vm/snapshot.py)
        args += ["-incoming", "defer"]
    return args


def qemu_command(
    options: VmOptions,
    run_dir: Path,
    accel: str,
    channel: Channel,
    saved: SavedMachine | None = None,
) -> list[str]:
    if options.layout not in LAYOUTS:
        raise VmError(f"unknown layout {options.layout!r}: {' or '.join(LAYOUTS)}")
    kata = options.layout == "kata-initrd"
    if saved is not None and (kata or channel.kind != "serial"):
        raise VmError("snapshots are made of the pykata layout with the serial channel only")
    command = [
        QEMU,
        "-name", "pykata-guest",
        *(_kata_initrd_machine(options, run_dir, accel) if kata
          else _pykata_machine(options, run_dir, accel, saved)),
        "-append", kernel_command_line(options, channel, saved is not None),
        "-qmp", f"unix:{run_dir / 'qmp.sock'},server=on,wait=off",
        *channel.qemu_args(options, run_dir),
    ]  # fmt: skip
    if saved is not None:
        # A shared directory's device cannot be migrated: vm/snapshot.py hotplugs it.
        return command + _saved_machine_args(options, saved) + options.extra_args
    if options.shared_dir is not None:
        # virtio-fs: virtiofsd serves the directory; guest memory must be shareable with it
        # (Kata backs it with a file in /dev/shm; we use a memfd).
        backend = "memory-backend-file,mem-path=/dev/shm" if kata else "memory-backend-memfd"
        command += [
            "-object", f"{backend},id=mem,size={options.memory_mib}M,share=on",
            "-numa", "node,memdev=mem",
            "-chardev", f"socket,id=virtiofs,path={run_dir / 'virtiofsd.sock'}",
            "-device", f"vhost-user-fs-pci,chardev=virtiofs,tag={SHARE_TAG}"
                       + (",queue-size=1024" if kata else ""),
        ]  # fmt: skip
    return command + options.extra_args
