"""What a guest is asked to be (VmOptions) and what a running one is (Vm)."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .image import GuestImage

if TYPE_CHECKING:
    from ..ttrpc.relay import RelayThread
    from .channel import Channel


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
    #: Restored from a snapshot: the generation id its agent was told (0: booted).
    generation: int = 0
    #: Restored: seconds from launch to each step - QEMU's monitor answering, the
    #: state loaded and the guest running, the agent's answer to the restore line.
    restore_steps: dict[str, float] = field(default_factory=dict)

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

    def stderr_tail(self) -> str:
        """QEMU's last word on stderr, as ": text" for an error message ("" if none)."""
        try:
            text = (self.run_dir / "qemu.stderr").read_text(errors="replace").strip()
        except OSError:
            return ""
        return ": " + text.splitlines()[-1] if text else ""
