"""A guest VM under QEMU with the agent as its init, driven from the host.

    with launched(VmOptions(image=current())) as vm:
        ...  # vm.agent_address answers ttRPC; vm.console_log has the guest's output

Channel: the agent serves on a virtio-serial port that QEMU exposes as the
unix socket `agent.sock` in the VM's run directory (our extension: the hosts
here have no /dev/vhost-vsock; see pykata.transport.serial). Spans leave the
guest on a second port, `trace.channel.0`, which QEMU connects to a
forwarder's unix socket; a third port carries the debug console when asked.

Acceleration: KVM when /dev/kvm opens and the guest kernel prints within
KVM_PROBE_SECONDS; otherwise software emulation (TCG). On these machines KVM
enters the guest but the kernel stalls, so the verdict is remembered per host
boot (`kvm.json` in the image cache) instead of being paid on every launch.

Layout: "pykata" boots our initramfs and root disk; "kata-initrd" boots the
image's Kata initrd the way Kata's runtime boots an initrd (q35, no disk, the
console on virtio-serial hvc0, Kata's kernel command line), so what a Kata
user would run can be tried, and tested, without Kata.

Whatever happens, no QEMU is left behind: QEMU gets SIGKILL when the
launching process dies (PR_SET_PDEATHSIG), and leaving `launched` stops it -
gracefully (Ctrl-Alt-Del: the agent, as init, turns it into a shutdown and
powers off), else by force.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..api import health_pb2
from ..children import die_with_parent
from ..transport import TransportError
from ..ttrpc import Client, TtrpcError
from ..ttrpc.relay import RelayThread
from . import SHARE_TAG
from .image import GuestImage

QEMU = "qemu-system-x86_64"
AGENT_PORT = "agent.channel.0"
TRACE_PORT = "trace.channel.0"
CONSOLE_PORT = "console.channel.0"
KVM_PROBE_SECONDS = 4.0
#: The kernel's first line on the serial console: proof the guest runs.
KERNEL_BANNER = b"Linux version"
VHOST_VSOCK = "/dev/vhost-vsock"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
AGENT_VSOCK_PORT = 1024
CONSOLE_VSOCK_PORT = 1026
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


class VmError(RuntimeError):
    """The VM could not be started or did not come up; the message says why."""


@dataclass
class VmOptions:
    image: GuestImage
    #: "auto" (KVM if it works here, else TCG), "kvm" or "tcg".
    accel: str = "auto"
    memory_mib: int = 512
    cpus: int = 1
    #: Extra kernel command line (agent.* options, maxcpus=...).
    kernel_params: str = ""
    #: "auto" (vsock when the host has /dev/vhost-vsock, else serial), "vsock" or "serial".
    channel: str = "auto"
    #: Serial channel: a forwarder's unix socket; the agent traces and its spans go there.
    #: (With vsock, trace with kernel_params "agent.trace": spans go to vsock port 10240.)
    trace_socket: str | None = None
    debug_console: bool = False
    #: A host directory shared with the guest over virtio-fs (tag SHARE_TAG), e.g. a bundle.
    shared_dir: Path | None = None
    #: Where the sockets and console log go (default: a new temporary directory).
    run_dir: Path | None = None
    boot_timeout: float = 120.0
    extra_args: list[str] = field(default_factory=list)
    #: "pykata" (initramfs + root disk) or "kata-initrd" (as Kata's runtime boots it).
    layout: str = "pykata"


@dataclass
class Vm:
    """A running guest."""

    process: subprocess.Popen[bytes]
    run_dir: Path
    channel: Channel
    accel: str
    #: Why this acceleration (one line, for the user).
    accel_reason: str
    launched_at: float
    #: Processes QEMU needs (virtiofsd): ended with it.
    helpers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    #: Serial channel: the relay that lets many clients share the agent's port.
    relay: RelayThread | None = None
    #: Seconds from launch to the agent's first answered Check.
    ready_after: float = 0.0

    @property
    def agent_address(self) -> str:
        return self.channel.agent_address(self.run_dir)

    @property
    def console_address(self) -> str:
        return self.channel.console_address(self.run_dir)

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    def console_tail(self, lines: int = 15) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return ""
        # Without the firmware's terminal escapes: this is read in error messages.
        text = re.sub(r"\x1b(\[[0-9;?]*[A-Za-z]|c)", "", text)
        return "\n".join(text.splitlines()[-lines:])


# --- acceleration ---------------------------------------------------------------


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _kvm_verdict_file(image: GuestImage) -> Path:
    return image.directory.parent / "kvm.json"


def remembered_kvm_verdict(image: GuestImage) -> str | None:
    """Why KVM failed on this host boot, if a probe found so; None if not known."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        verdict = json.loads(_kvm_verdict_file(image).read_text())
        if verdict["boot_id"] == _boot_id():
            return str(verdict["failure"]) if verdict["failure"] else None
    return None


def remember_kvm_verdict(image: GuestImage, failure: str) -> None:
    with contextlib.suppress(OSError):
        _kvm_verdict_file(image).write_text(
            json.dumps({"boot_id": _boot_id(), "failure": failure}) + "\n"
        )


def kvm_unusable() -> str | None:
    """Why KVM cannot even be tried; None if /dev/kvm opens."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm: {exc.strerror}"
    os.close(fd)
    return None


# --- the QEMU command line --------------------------------------------------------


def _server_socket(name: str, path: Path) -> str:
    """A chardev: a unix socket QEMU listens on (one client at a time)."""
    return f"socket,id={name},path={path},server=on,wait=off"


def _port(name: str, chardev: str) -> list[str]:
    return ["-chardev", chardev, "-device", f"virtserialport,chardev={name},name={name}"]


@dataclass(frozen=True)
class Channel:
    """How host and agent talk: vsock (standard), or virtio-serial ports (our extension)."""

    kind: str
    #: The guest's vsock CID (vsock only).
    cid: int = 0

    @classmethod
    def choose(cls, requested: str) -> Channel:
        if requested == "auto":
            requested = "vsock" if os.access(VHOST_VSOCK, os.R_OK | os.W_OK) else "serial"
        if requested not in ("vsock", "serial"):
            raise VmError(f"unknown channel {requested!r}: auto, vsock or serial")
        # A random CID: QEMU refuses one in use, and two guests rarely draw the same.
        return cls(requested, secrets.randbelow(0xFFFF_FFF0) + 3 if requested == "vsock" else 0)

    def agent_address(self, run_dir: Path) -> str:
        if self.kind == "vsock":
            return f"vsock://{self.cid}:{AGENT_VSOCK_PORT}"
        return f"unix://{run_dir / 'agent.sock'}"

    def console_address(self, run_dir: Path) -> str:
        if self.kind == "vsock":
            return f"vsock://{self.cid}:{CONSOLE_VSOCK_PORT}"
        return f"unix://{run_dir / 'console.sock'}"

    def kernel_params(self, options: VmOptions) -> list[str]:
        if self.kind == "vsock":  # the agent's defaults are vsock's: port 1024, spans to 10240
            console = [f"agent.debug_console_vport={CONSOLE_VSOCK_PORT}"]
            return ["agent.debug_console", *console] if options.debug_console else []
        params = [f"agent.server_addr=serial://{AGENT_PORT}"]
        if options.trace_socket:
            params += ["agent.trace", f"agent.trace_addr=serial://{TRACE_PORT}"]
        if options.debug_console:
            params += ["agent.debug_console", f"agent.debug_console_addr=serial://{CONSOLE_PORT}"]
        return params

    def qemu_args(self, options: VmOptions, run_dir: Path) -> list[str]:
        if self.kind == "vsock":
            if options.trace_socket:
                raise VmError(
                    "with the vsock channel the agent's spans go to the host's vsock port "
                    "10240: run kata-trace-forwarder with its defaults and pass "
                    "--kernel-params agent.trace instead of --trace-socket"
                )
            return ["-device", f"vhost-vsock-pci,guest-cid={self.cid}"]
        args = ["-device", "virtio-serial-pci"]
        # QEMU's socket takes one client; the relay in front of it takes any number.
        args += _port(AGENT_PORT, _server_socket(AGENT_PORT, run_dir / "agent-port.sock"))
        if options.trace_socket:
            # QEMU connects to the forwarder, and again (each second) if it was not there yet.
            args += _port(
                TRACE_PORT, f"socket,id={TRACE_PORT},path={options.trace_socket},reconnect=1"
            )
        if options.debug_console:
            args += _port(CONSOLE_PORT, _server_socket(CONSOLE_PORT, run_dir / "console.sock"))
        return args


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


def _spawn(command: list[str], stderr: Path) -> subprocess.Popen[bytes]:
    with open(stderr, "wb") as errors:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            preexec_fn=die_with_parent(signal.SIGKILL),
            start_new_session=True,  # a Ctrl-C at the terminal is ours to handle, not theirs
        )


def _start_virtiofsd(shared_dir: Path, run_dir: Path) -> subprocess.Popen[bytes]:
    """virtiofsd serving `shared_dir`, once its socket is there for QEMU to connect to."""
    if not os.access(VIRTIOFSD, os.X_OK):
        raise VmError(f"{VIRTIOFSD} is missing (it comes with qemu-system-common)")
    if not shared_dir.is_dir():
        raise VmError(f"cannot share {shared_dir} with the guest: not a directory")
    socket_path = run_dir / "virtiofsd.sock"
    socket_path.unlink(missing_ok=True)
    command = [VIRTIOFSD, f"--socket-path={socket_path}", "-o", f"source={shared_dir}",
               "-o", "cache=auto"]  # fmt: skip
    daemon = _spawn(command, run_dir / "virtiofsd.stderr")
    deadline = time.monotonic() + 10
    while not socket_path.exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            daemon.kill()
            detail = (run_dir / "virtiofsd.stderr").read_text(errors="replace").strip()
            raise VmError(f"virtiofsd did not start: {detail[-500:] or 'no socket after 10s'}")
        time.sleep(0.02)
    return daemon


def _start(
    options: VmOptions, run_dir: Path, accel: str, channel: Channel
) -> tuple[subprocess.Popen[bytes], list[subprocess.Popen[bytes]]]:
    """QEMU, and the helpers it needs (virtiofsd)."""
    if shutil.which(QEMU) is None:
        raise VmError(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    for name in ("console.log", "agent.sock", "agent-port.sock", "qmp.sock", "console.sock"):
        (run_dir / name).unlink(missing_ok=True)
    helpers = []
    if options.shared_dir is not None:
        helpers.append(_start_virtiofsd(options.shared_dir, run_dir))
    try:
        command = qemu_command(options, run_dir, accel, channel)
        return _spawn(command, run_dir / "qemu.stderr"), helpers
    except BaseException:
        _end(helpers)
        raise


def _end(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


def _guest_started(
    process: subprocess.Popen[bytes], log: Path, timeout: float, sign: bytes
) -> bool:
    """Did `sign` appear on the guest's console within `timeout`?"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError):
            if sign in log.read_bytes():
                return True
        time.sleep(0.1)
    return False


# --- readiness and shutdown -------------------------------------------------------


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
                f"{_stderr_tail(vm)}\nguest console:\n{vm.console_tail()}"
            ) from None
        raise VmError(
            f"the agent did not answer Check within {timeout:.0f}s ({exc})\n"
            f"guest console:\n{vm.console_tail()}"
        ) from exc
    vm.ready_after = time.monotonic() - vm.launched_at


def _stderr_tail(vm: Vm) -> str:
    with contextlib.suppress(OSError):
        text = (vm.run_dir / "qemu.stderr").read_text(errors="replace").strip()
        if text:
            return ": " + text.splitlines()[-1]
    return ""


def qmp(vm: Vm, command: str, arguments: dict[str, object] | None = None) -> None:
    """One QMP command (the QEMU monitor protocol: JSON lines on a unix socket)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(vm.qmp_socket))
        replies = sock.makefile("rb")
        replies.readline()  # the greeting
        requests: list[dict[str, object]] = [
            {"execute": "qmp_capabilities"},
            {"execute": command, **({"arguments": arguments} if arguments else {})},
        ]
        for request in requests:
            sock.sendall(json.dumps(request).encode() + b"\n")
            while True:  # skip asynchronous events until the reply
                reply = json.loads(replies.readline() or b"{}")
                if "event" not in reply:
                    break
            if "error" in reply:
                raise VmError(f"QMP {request['execute']}: {reply['error'].get('desc')}")


def stop(vm: Vm, grace: float = 20.0) -> str:
    """Stop the VM: 'powered off' (the agent shut down cleanly) or how it was forced."""
    try:
        return _stop_qemu(vm, grace)
    finally:
        _end_companions(vm)


def _stop_qemu(vm: Vm, grace: float) -> str:
    if vm.process.poll() is not None:
        return "already stopped"
    try:
        # Ctrl-Alt-Del reaches the agent (init) as SIGINT: it stops and powers off.
        keys = [{"type": "qcode", "data": key} for key in ("ctrl", "alt", "delete")]
        qmp(vm, "send-key", {"keys": keys})
        vm.process.wait(grace)
        return "powered off"
    except (OSError, VmError, ValueError, subprocess.TimeoutExpired):
        pass
    with contextlib.suppress(OSError, VmError, ValueError):
        qmp(vm, "quit")
    try:
        vm.process.wait(5)
        return "quit (the guest did not power off in time)"
    except subprocess.TimeoutExpired:
        vm.process.kill()
        vm.process.wait()
        return "killed"


# --- launching --------------------------------------------------------------------


def choose_accel(options: VmOptions) -> tuple[list[str], str]:
    """Accelerators to try in order, and why."""
    if options.accel == "tcg":
        return ["tcg"], "tcg (asked for)"
    if options.accel == "kvm":
        return ["kvm"], "kvm (asked for)"
    unusable = kvm_unusable() or remembered_kvm_verdict(options.image)
    if unusable:
        return ["tcg"], f"tcg (software emulation; KVM unusable here: {unusable})"
    return ["kvm", "tcg"], "kvm"


def _probe_seconds(options: VmOptions) -> float:
    # Kata's guest is quiet until the agent speaks on hvc0, after the initrd is unpacked.
    return KVM_PROBE_SECONDS * (2 if options.layout == "kata-initrd" else 1)


def _kvm_works(vm: Vm, options: VmOptions) -> bool:
    """Our kernel prints its banner on ttyS0 at once; Kata's layout has only hvc0, where
    (quiet) the first line is the agent's JSON announce line."""
    sign = b"{" if options.layout == "kata-initrd" else KERNEL_BANNER
    return _guest_started(vm.process, vm.console_log, _probe_seconds(options), sign)


def boot(options: VmOptions, run_dir: Path) -> Vm:
    """Start QEMU (probing KVM when it may work) and wait until the agent answers."""
    accels, reason = choose_accel(options)
    channel = Channel.choose(options.channel)
    for accel in accels:
        started = time.monotonic()
        process, helpers = _start(options, run_dir, accel, channel)
        vm = Vm(process, run_dir, channel, accel, reason, started, helpers)
        probing = accel == "kvm" and len(accels) > 1
        if probing and not _kvm_works(vm, options):
            failure = f"the guest printed nothing within {_probe_seconds(options):.0f}s"
            stop_now(vm)
            if options.layout == "pykata":  # the verdict our own layout's kernel gave
                remember_kvm_verdict(options.image, failure)
            reason = f"tcg (software emulation; KVM unusable here: {failure})"
            continue
        try:
            if channel.kind == "serial":
                vm.relay = _start_relay(vm)
            wait_for_agent(vm, options.boot_timeout)
        except BaseException:
            stop_now(vm)
            raise
        return vm
    raise AssertionError("unreachable: TCG is always tried last")


def stop_now(vm: Vm) -> None:
    _end([vm.process])
    _end_companions(vm)


def _end_companions(vm: Vm) -> None:
    """What runs for QEMU's sake (virtiofsd, the relay): ended once QEMU is."""
    _end(vm.helpers)
    if vm.relay is not None:
        vm.relay.close()


def _start_relay(vm: Vm) -> RelayThread:
    """The relay in front of QEMU's socket for the agent's port, once that socket is there."""
    port = vm.run_dir / "agent-port.sock"
    deadline = time.monotonic() + 10
    while not port.exists():
        if vm.process.poll() is not None or time.monotonic() > deadline:
            raise VmError(f"QEMU did not make {port}{_stderr_tail(vm)}")
        time.sleep(0.02)
    try:
        return RelayThread(f"unix://{port}", vm.agent_address)
    except (TransportError, OSError) as exc:
        raise VmError(f"cannot relay the agent's port: {exc}") from exc


@contextlib.contextmanager
def launched(options: VmOptions) -> Iterator[Vm]:
    """A booted guest whose agent answers; stopped (and its run directory gone) on exit."""
    own_dir = options.run_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="pykata-vm-")) if own_dir else options.run_dir
    assert run_dir is not None
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir.chmod(0o700)  # the agent's socket: as private as the agent's own would be
    try:
        vm = boot(options, run_dir)
        try:
            yield vm
        finally:
            stop(vm)
    finally:
        if own_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
