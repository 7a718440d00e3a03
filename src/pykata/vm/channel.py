"""How host and agent talk: vsock (Kata's standard) or virtio-serial ports (our extension).

The hosts here have no /dev/vhost-vsock, so by default the agent serves on a
virtio-serial port that QEMU exposes as a unix socket; spans leave the guest on
a second port, which QEMU connects to a forwarder's unix socket; a third port
carries the debug console when asked. See docs/vm.md.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import VmError

if TYPE_CHECKING:
    from .machine import VmOptions

AGENT_PORT = "agent.channel.0"
TRACE_PORT = "trace.channel.0"
CONSOLE_PORT = "console.channel.0"
#: Where a guest made for a snapshot parks and a restored one learns it is new.
RESTORE_PORT = "restore.channel.0"
VHOST_VSOCK = "/dev/vhost-vsock"
AGENT_VSOCK_PORT = 1024
CONSOLE_VSOCK_PORT = 1026


def server_socket(name: str, path: Path) -> str:
    """A chardev: a unix socket QEMU listens on (one client at a time)."""
    return f"socket,id={name},path={path},server=on,wait=off"


def port(name: str, chardev: str) -> list[str]:
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
        args += port(AGENT_PORT, server_socket(AGENT_PORT, run_dir / "agent-port.sock"))
        if options.trace_socket:
            # QEMU connects to the forwarder, and again (each second) if it was not there yet.
            args += port(
                TRACE_PORT, f"socket,id={TRACE_PORT},path={options.trace_socket},reconnect=1"
            )
        if options.debug_console:
            args += port(CONSOLE_PORT, server_socket(CONSOLE_PORT, run_dir / "console.sock"))
        return args
