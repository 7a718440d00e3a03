"""The QEMU command line and the guest kernel's, for each layout.

"pykata" boots our initramfs and root disk on QEMU's `pc` machine;
"kata-initrd" boots the image's Kata initrd the way Kata's runtime boots an
initrd (q35, no disk, the console on virtio-serial hvc0, Kata's kernel
command line), so what a Kata user would run can be tried without Kata.
"""

from __future__ import annotations

from pathlib import Path

from . import SHARE_TAG
from .channel import Channel
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


def kernel_command_line(options: VmOptions, channel: Channel) -> str:
    if options.layout == "kata-initrd":
        params = [*KATA_KERNEL_PARAMS, f"nr_cpus={options.cpus}", *KATA_KERNEL_PARAMS_AFTER]
    else:
        params = ["console=ttyS0", "panic=-1", "quiet"]
    params += channel.kernel_params(options)
    if options.kernel_params:
        params.append(options.kernel_params)
    return " ".join(params)


def _pykata_machine(options: VmOptions, run_dir: Path, accel: str) -> list[str]:
    """Our layout: the `pc` machine, our initramfs, the root disk (a snapshot), ttyS0."""
    image = options.image
    return [
        "-machine", f"pc,accel={accel}",
        "-cpu", "max" if accel == "tcg" else "host",
        "-m", str(options.memory_mib),
        "-smp", str(options.cpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initramfs),
        # snapshot: the guest's writes go to a temporary overlay; the image stays as built.
        "-drive", f"file={image.root_disk},format=raw,if=virtio,snapshot=on",
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


def qemu_command(options: VmOptions, run_dir: Path, accel: str, channel: Channel) -> list[str]:
    if options.layout not in LAYOUTS:
        raise VmError(f"unknown layout {options.layout!r}: {' or '.join(LAYOUTS)}")
    kata = options.layout == "kata-initrd"
    machine = _kata_initrd_machine if kata else _pykata_machine
    command = [
        QEMU,
        "-name", "pykata-guest",
        *machine(options, run_dir, accel),
        "-append", kernel_command_line(options, channel),
        "-qmp", f"unix:{run_dir / 'qmp.sock'},server=on,wait=off",
        *channel.qemu_args(options, run_dir),
    ]  # fmt: skip
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
