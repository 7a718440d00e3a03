"""A guest VM under QEMU with the agent as its init, driven from the host.

    with launched(VmOptions(image=current())) as vm:
        ...  # vm.agent_address answers ttRPC; vm.console_log has the guest's output

This module composes the launcher's parts, one job each: accel (KVM or
software emulation), channel (how host and agent talk), cmdline (QEMU's and
the kernel's command lines), process (QEMU and virtiofsd as processes),
readiness (waiting for the agent) and qmp (the monitor).

Whatever happens, no QEMU is left behind: QEMU gets SIGKILL when the
launching process dies (PR_SET_PDEATHSIG), and leaving `launched` stops it -
gracefully (Ctrl-Alt-Del: the agent, as init, turns it into a shutdown and
powers off), else by force.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import process
from .accel import (
    KVM_PROBE_SECONDS,
    choose_accel,
    first_sign,
    kvm_unusable,
    probe_seconds,
    remember_kvm_verdict,
    remembered_kvm_verdict,
)
from .channel import AGENT_PORT, CONSOLE_PORT, TRACE_PORT, Channel
from .cmdline import QEMU, kernel_command_line, qemu_command
from .errors import VmError
from .machine import Vm, VmOptions
from .qmp import qmp_socket_call
from .readiness import guest_started, start_relay, wait_for_agent

__all__ = [
    "AGENT_PORT", "CONSOLE_PORT", "KVM_PROBE_SECONDS", "QEMU", "TRACE_PORT", "Channel", "Vm",
    "VmError", "VmOptions", "boot", "choose_accel", "kernel_command_line", "kvm_unusable",
    "launched", "qemu_command", "qmp", "remember_kvm_verdict", "remembered_kvm_verdict",
    "stop", "stop_now", "wait_for_agent",
]  # fmt: skip


def qmp(vm: Vm, command: str, arguments: dict[str, object] | None = None) -> Any:
    """One QMP command to the VM; its return value."""
    return qmp_socket_call(vm.qmp_socket, command, arguments)


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


def stop_now(vm: Vm) -> None:
    process.end([vm.process])
    _end_companions(vm)


def _end_companions(vm: Vm) -> None:
    """What runs for QEMU's sake (virtiofsd, the relay): ended once QEMU is."""
    process.end(vm.helpers)
    if vm.relay is not None:
        vm.relay.close()


def _kvm_works(vm: Vm, options: VmOptions) -> bool:
    return guest_started(vm.process, vm.console_log, probe_seconds(options), first_sign(options))


def boot(options: VmOptions, run_dir: Path) -> Vm:
    """Start QEMU (probing KVM when it may work) and wait until the agent answers."""
    accels, reason = choose_accel(options)
    channel = Channel.choose(options.channel)
    for accel in accels:
        started = time.monotonic()
        qemu, helpers = process.start(options, run_dir, accel, channel)
        vm = Vm(qemu, run_dir, channel, accel, reason, started, helpers)
        probing = accel == "kvm" and len(accels) > 1
        if probing and not _kvm_works(vm, options):
            failure = f"the guest printed nothing within {probe_seconds(options):.0f}s"
            stop_now(vm)
            if options.layout == "pykata":  # the verdict our own layout's kernel gave
                remember_kvm_verdict(options.image, failure)
            reason = f"tcg (software emulation; KVM unusable here: {failure})"
            continue
        try:
            if channel.kind == "serial":
                vm.relay = start_relay(vm)
            wait_for_agent(vm, options.boot_timeout)
        except BaseException:
            stop_now(vm)
            raise
        return vm
    raise AssertionError("unreachable: TCG is always tried last")


@contextlib.contextmanager
def run_directory(given: Path | None) -> Iterator[Path]:
    """The VM's run directory, private; a temporary one (removed after) unless given."""
    run_dir = Path(tempfile.mkdtemp(prefix="pykata-vm-")) if given is None else given
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        run_dir.chmod(0o700)  # the agent's socket: as private as the agent's own would be
        yield run_dir
    finally:
        if given is None:
            shutil.rmtree(run_dir, ignore_errors=True)


@contextlib.contextmanager
def launched(options: VmOptions) -> Iterator[Vm]:
    """A booted guest whose agent answers; stopped (and its run directory gone) on exit."""
    with run_directory(options.run_dir) as run_dir:
        vm = boot(options, run_dir)
        try:
            yield vm
        finally:
            stop(vm)
