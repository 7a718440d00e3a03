"""Snapshots: boot a guest once, save it parked, restore it for every new sandbox.

    snap = ensure(options)                  # made once per image and machine shape; cached
    with restored(options, snap) as vm:     # a new guest, its agent answering at once
        ...

Making one: the guest boots with its RAM in a file (`memory`, share=on) and its
disk writes in its own copy of the root disk (`disk.img`); the agent, told
`agent.restore_addr`, does its start-up and parks on the restore port
(agent/restore.py). QEMU is then stopped and migrated to `state` with
x-ignore-shared, so the stream holds the devices only: the RAM is the file.

Restoring: a new QEMU with the same machine maps `memory` copy-on-write
(share=off: guests share its pages until they write them), puts a temporary
overlay on `disk.img` and loads `state`. The launcher then tells the agent
it is a new guest (fresh entropy, the time, a generation id), and the agent
acts on that before it serves anything.

A shared directory (virtio-fs) cannot be migrated: a guest restored with one
gets a private copy of the memory file (virtiofsd must map the guest's RAM,
and a copy-on-write mapping is QEMU's alone) and the vhost-user-fs device is
hotplugged after the restore; the agent waits for it before it answers.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import SHARE_TAG, process
from .channel import Channel
from .cmdline import QEMU, SavedMachine
from .errors import VmError
from .image import _key
from .machine import Vm, VmOptions
from .qemu import run_directory, stop, stop_now
from .qmp import QmpSession
from .readiness import start_relay, wait_for_agent

log = logging.getLogger(__name__)

#: Bump when what a snapshot holds changes in a way its key does not show.
FORMAT = 2
MANIFEST = "snapshot.json"
#: How long a restored agent may take to answer the restore line.
RESTORE_SECONDS = 30.0
#: Where a guest restored with a shared directory keeps its private copy of the memory.
PRIVATE_MEMORY_DIR = Path("/dev/shm")
#: The copies' names: this, the launcher's PID, "-", a random part.
PRIVATE_MEMORY_PREFIX = "pykata-vm-memory-"
#: Where a bzImage says how many 512-byte setup sectors follow its boot sector
#: (the Linux x86 boot protocol; 0 means 4).
SETUP_SECTS_OFFSET = 0x1F1


@dataclass(frozen=True)
class Snapshot:
    """A saved guest: the files a restore maps and loads."""

    directory: Path

    @property
    def memory(self) -> Path:
        return self.directory / "memory"

    @property
    def state(self) -> Path:
        return self.directory / "state"

    @property
    def disk(self) -> Path:
        return self.directory / "disk.img"

    @property
    def kernel_stub(self) -> Path:
        return self.directory / "kernel-header"

    @property
    def manifest(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((self.directory / MANIFEST).read_text())
        return loaded

    def exists(self) -> bool:
        return (self.directory / MANIFEST).is_file()

    def up_to_date(self, options: VmOptions) -> bool:
        """Made for this image and these options, by this QEMU."""
        return self.exists() and self.manifest.get("key") == key(options)


@functools.cache
def qemu_version() -> str:
    done = subprocess.run([QEMU, "--version"], capture_output=True, text=True)
    return done.stdout.splitlines()[0] if done.stdout else ""


def snapshot_accel(options: VmOptions) -> str:
    """KVM only when asked: a saved CPU state restores only under the accelerator that
    made it, and `auto`'s probe would cost more than the restore."""
    return "kvm" if options.accel == "kvm" else "tcg"


def shape(options: VmOptions) -> dict[str, Any]:
    """What a snapshot fixes about its guests: a restore must ask for the same."""
    return {
        "image": options.image.directory.name,
        "accel": snapshot_accel(options),
        "memory_mib": options.memory_mib,
        "cpus": options.cpus,
        "kernel_params": options.kernel_params,
        "debug_console": options.debug_console,
        "tracing": options.trace_socket is not None,
        "extra_args": options.extra_args,
    }


def key(options: VmOptions) -> str:
    return _key("snapshot", FORMAT, shape(options), qemu_version())


def default_directory(options: VmOptions) -> Path:
    """In the image's own directory: a new image (new sources) gets new snapshots."""
    return options.image.directory / f"snapshot-{key(options)}"


def _check_options(options: VmOptions) -> None:
    if options.layout != "pykata":
        raise VmError("snapshots are of the pykata layout (not --kata-initrd)")
    if Channel.choose(options.channel).kind != "serial":
        raise VmError("snapshots use the serial channel: pass --channel serial")


def ensure(options: VmOptions, directory: Path | None = None) -> Snapshot:
    """The snapshot for these options: the one in `directory` if it is up to date, else new."""
    _check_options(options)
    snapshot = Snapshot(directory or default_directory(options))
    if snapshot.up_to_date(options):
        return snapshot
    snapshot.directory.parent.mkdir(parents=True, exist_ok=True)
    # One maker at a time (two test sessions, two launchers): the second finds it made.
    lock = snapshot.directory.with_name(f".{snapshot.directory.name}.lock")
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if snapshot.up_to_date(options):
            return snapshot
        # A shared directory is attached at restore, never saved in the snapshot.
        return make(replace(options, shared_dir=None), snapshot.directory)


# --- making one -----------------------------------------------------------------


def _connect(path: Path, vm: Vm, timeout: float) -> socket.socket:
    """A connection to QEMU's listening socket `path`, once QEMU listens."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError:
            sock.close()
        if vm.process.poll() is not None:
            raise VmError(f"QEMU exited ({vm.process.returncode}){vm.stderr_tail()}")
        if time.monotonic() > deadline:
            raise VmError(f"QEMU did not listen on {path} within {timeout:.0f}s")
        time.sleep(0.01)


def _read_line(sock: socket.socket, vm: Vm, timeout: float, what: str) -> dict[str, Any]:
    """One JSON line from the guest's restore port, watching QEMU meanwhile."""
    deadline = time.monotonic() + timeout
    data = b""
    sock.settimeout(0.2)
    while b"\n" not in data:
        if vm.process.poll() is not None:
            raise VmError(
                f"QEMU exited ({vm.process.returncode}) before {what}{vm.stderr_tail()}\n"
                f"guest console:\n{vm.console_tail()}"
            )
        if time.monotonic() > deadline:
            raise VmError(f"no {what} within {timeout:.0f}s\nguest console:\n{vm.console_tail()}")
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:  # reset: QEMU is going away, said by the check above
            chunk = b""
        if not chunk:
            with contextlib.suppress(subprocess.TimeoutExpired):
                vm.process.wait(2)
            if vm.process.poll() is None:
                raise VmError(f"the restore port closed before {what}")
            continue
        data += chunk
    line: dict[str, Any] = json.loads(data.split(b"\n", 1)[0])
    return line


def _ignore_shared_memory(monitor: QmpSession) -> None:
    """x-ignore-shared: the RAM file is not in the migration stream (cmdline.py)."""
    capabilities = [{"capability": "x-ignore-shared", "state": True}]
    monitor.call("migrate-set-capabilities", {"capabilities": capabilities})


def _monitor(vm: Vm, timeout: float = 10.0) -> QmpSession:
    """A monitor session, once QEMU listens on its socket."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return QmpSession(vm.qmp_socket)
        except OSError:
            pass
        if vm.process.poll() is not None:
            raise VmError(f"QEMU exited ({vm.process.returncode}){vm.stderr_tail()}")
        if time.monotonic() > deadline:
            raise VmError(f"QEMU's monitor did not answer within {timeout:.0f}s")
        time.sleep(0.002)


def _wait_migrated(monitor: QmpSession, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = monitor.call("query-migrate") or {}
        if status.get("status") == "completed":
            return
        if status.get("status") in ("failed", "cancelled"):
            raise VmError(f"saving the guest failed: {status.get('error-desc', status)}")
        if time.monotonic() > deadline:
            raise VmError(f"saving the guest took over {timeout:.0f}s: {status}")
        time.sleep(0.05)


def _copy_disk(base: Path, copy: Path) -> None:
    """The snapshot's own copy of the root disk (sparse): its boot writes it, restores
    put a temporary overlay on it; the image's disk stays as built."""
    done = subprocess.run(
        ["cp", "--sparse=always", "--reflink=auto", str(base), str(copy)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode:
        raise VmError(f"cannot copy {base} for the snapshot: {done.stderr.strip()}")


def make(options: VmOptions, directory: Path) -> Snapshot:
    """Boot a guest parked for a snapshot and save it into `directory` (replacing it)."""
    _check_options(options)
    if options.shared_dir is not None:
        raise VmError("a snapshot is made without a shared directory: give it at restore")
    if directory.exists() and any(directory.iterdir()) and not Snapshot(directory).exists():
        # Never replace what is not ours: a snapshot directory holds a snapshot.json.
        raise VmError(f"{directory} is not empty and holds no snapshot: give a new directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        snapshot = Snapshot(building)
        _copy_disk(options.image.root_disk, snapshot.disk)
        write_kernel_stub(options.image.kernel, snapshot.kernel_stub)
        started = time.monotonic()
        with run_directory(None) as run_dir:
            # The trace port's chardev is not migrated: each restore names its own socket.
            saving = _saving_options(options, run_dir)
            saved = SavedMachine(
                snapshot.memory, True, snapshot.disk, True, run_dir / "restore.sock"
            )
            vm = _launch(saving, run_dir, saved)
            try:
                with _connect(saved.restore_socket, vm, 10) as port:
                    _read_line(port, vm, options.boot_timeout, "the agent parked")
                    booted_s = time.monotonic() - started
                    with _monitor(vm) as monitor:
                        monitor.call("stop")
                        _ignore_shared_memory(monitor)
                        target = f"exec:cat > {_quote(snapshot.state)}"
                        monitor.call("migrate", {"uri": target})
                        _wait_migrated(monitor)
                        monitor.call("quit")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    vm.process.wait(30)  # saved already: stop_now ends a QEMU slow to quit
            finally:
                stop_now(vm)
        (building / MANIFEST).write_text(json.dumps({
            "key": key(options), "shape": shape(options), "qemu": qemu_version(),
            "image": str(options.image.directory), "made": time.time(),
            "boot_s": round(booted_s, 2),
        }, indent=1) + "\n")  # fmt: skip
        _replace_dir(building, directory)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return Snapshot(directory)


def write_kernel_stub(kernel: Path, stub: Path) -> None:
    """The kernel's real-mode header (its setup sectors) and a page of zeros: what QEMU
    needs to set up the same machine for a restored guest, without the 14 MB it would
    otherwise keep for a boot that will not happen (cmdline.py)."""
    with open(kernel, "rb") as image:
        header = image.read(SETUP_SECTS_OFFSET + 1)
        if len(header) <= SETUP_SECTS_OFFSET:
            raise VmError(f"{kernel} is not a Linux kernel image (too short)")
        setup_bytes = ((header[SETUP_SECTS_OFFSET] or 4) + 1) * 512
        image.seek(0)
        setup = image.read(setup_bytes)
    stub.write_bytes(setup + bytes(4096))


def _quote(path: Path) -> str:
    return shlex.quote(str(path))


def _replace_dir(new: Path, target: Path) -> None:
    """`new` becomes `target`; an old `target` is removed after (never half of each)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _saving_options(options: VmOptions, run_dir: Path) -> VmOptions:
    """The options of the guest a snapshot is made of: nothing shared, sockets here."""
    trace = str(run_dir / "trace.sock") if options.trace_socket else None
    return replace(options, shared_dir=None, trace_socket=trace, run_dir=run_dir)


def _launch(options: VmOptions, run_dir: Path, saved: SavedMachine) -> Vm:
    channel = Channel("serial")
    started = time.monotonic()
    accel = snapshot_accel(options)
    qemu, helpers = process.start(options, run_dir, accel, channel, saved)
    return Vm(qemu, run_dir, channel, accel, "", started, helpers)


# --- restoring ------------------------------------------------------------------


def _check_shape(options: VmOptions, snapshot: Snapshot) -> None:
    if not snapshot.exists():
        raise VmError(
            f"no snapshot in {snapshot.directory}: make one with "
            f"`kata-agent-ctl vm --snapshot {snapshot.directory}`"
        )
    made, wanted = snapshot.manifest.get("shape", {}), shape(options)
    differ = sorted(name for name in wanted if made.get(name) != wanted[name])
    if differ:
        shown = ", ".join(f"{n} {made.get(n)!r} (asked: {wanted[n]!r})" for n in differ)
        raise VmError(
            f"snapshot {snapshot.directory} was made for another guest: {shown}; "
            "make it again with these options (vm --snapshot DIR)"
        )


def _private_memory(snapshot: Snapshot) -> Path:
    """A copy of the memory file that the guest (and virtiofsd) may write: sparse, in RAM.

    Its name holds our PID, so a later launcher can tell a copy left by one that
    was killed before it removed it (remove_stale_memory).
    """
    prefix = f"{PRIVATE_MEMORY_PREFIX}{os.getpid()}-"
    fd, name = tempfile.mkstemp(prefix=prefix, dir=PRIVATE_MEMORY_DIR)
    os.close(fd)
    done = subprocess.run(
        ["cp", "--sparse=always", str(snapshot.memory), name], capture_output=True, text=True
    )
    if done.returncode:
        os.unlink(name)
        raise VmError(f"cannot copy the snapshot's memory: {done.stderr.strip()}")
    return Path(name)


def remove_stale_memory(directory: Path = PRIVATE_MEMORY_DIR) -> list[Path]:
    """Remove the memory copies whose launcher is gone (SIGKILLed while restoring);
    the ones removed. A copy is in RAM (/dev/shm): left, it would hold the memory
    until the host reboots."""
    removed = []
    for path in directory.glob(f"{PRIVATE_MEMORY_PREFIX}*-*"):
        owner = path.name[len(PRIVATE_MEMORY_PREFIX) :].split("-", 1)[0]
        if not owner.isdigit() or _alive(int(owner)):
            continue
        with contextlib.suppress(FileNotFoundError, PermissionError):
            path.unlink()
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _load_state(vm: Vm, monitor: QmpSession, snapshot: Snapshot, timeout: float = 60.0) -> None:
    """Load the saved devices into the waiting QEMU (`-incoming defer`) and run the guest.

    The guest was saved paused, so it stays paused after the load until `cont`.
    """
    _ignore_shared_memory(monitor)
    monitor.call("migrate-incoming", {"uri": f"exec:cat {_quote(snapshot.state)}"})
    deadline = time.monotonic() + timeout
    while (monitor.call("query-migrate") or {}).get("status") != "completed":
        if vm.process.poll() is not None:
            raise VmError(
                f"QEMU exited ({vm.process.returncode}) restoring the snapshot{vm.stderr_tail()}"
            )
        if time.monotonic() > deadline:
            raise VmError(f"the snapshot was not loaded within {timeout:.0f}s{vm.stderr_tail()}")
        time.sleep(0.002)
    monitor.call("cont")


def _hotplug_share(vm: Vm, monitor: QmpSession) -> None:
    """The vhost-user-fs device, attached now that the guest runs (it cannot be migrated)."""
    chardev = {"id": "virtiofs", "backend": {"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": str(vm.run_dir / "virtiofsd.sock")}},
        "server": False}}}  # fmt: skip
    monitor.call("chardev-add", chardev)
    device = {"driver": "vhost-user-fs-pci", "id": "share0", "chardev": "virtiofs",
              "tag": SHARE_TAG}  # fmt: skip
    monitor.call("device_add", device)


def restore_line(share: bool) -> tuple[int, bytes]:
    """The restore line (agent/restore.py): fresh entropy, the time, a generation id."""
    generation = secrets.randbelow(1 << 62) + 1
    message: dict[str, object] = {
        "generation": generation,
        "time_ns": time.time_ns(),
        "entropy": secrets.token_bytes(64).hex(),
    }
    if share:
        message["share"] = SHARE_TAG
    return generation, json.dumps(message).encode() + b"\n"


class _Checking:
    """wait_for_agent on a thread of its own, so it runs while the guest is restored."""

    def __init__(self, vm: Vm, timeout: float) -> None:
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(vm, timeout), daemon=True)
        self._thread.start()

    def _run(self, vm: Vm, timeout: float) -> None:
        try:
            wait_for_agent(vm, timeout)
        except BaseException as exc:  # handed to the launching thread in join()
            self.failure = exc

    def join(self) -> None:
        self._thread.join()
        if self.failure is not None:
            raise self.failure


def restore(options: VmOptions, snapshot: Snapshot, run_dir: Path) -> Vm:
    """A guest from `snapshot`, told it is new, its agent answering Check.

    The launcher's side is ready before the guest runs: the restore line is in the
    restore port's socket and the relay's connection and the Check are waiting on the
    agent's port, so QEMU hands them over as soon as the parked agent reads.
    """
    _check_options(options)
    _check_shape(options, snapshot)
    started = time.monotonic()
    for path in remove_stale_memory():
        log.warning("removed %s, a memory copy whose launcher was killed", path)
    share = options.shared_dir is not None
    memory = _private_memory(snapshot) if share else snapshot.memory
    try:
        saved = SavedMachine(
            memory, share, snapshot.disk, False, run_dir / "restore.sock", snapshot.state,
            snapshot.kernel_stub,
        )  # fmt: skip
        channel = Channel("serial")
        accel = snapshot_accel(options)
        qemu, helpers = process.start(options, run_dir, accel, channel, saved)
        reason = f"{accel} (as the snapshot was made)"
        vm = Vm(qemu, run_dir, channel, accel, reason, started, helpers)
        try:
            _restore_and_check(vm, snapshot, saved, options.boot_timeout)
        except BaseException:
            stop_now(vm)
            raise
        return vm
    finally:
        if share:  # QEMU holds it open; nothing else needs its name
            memory.unlink(missing_ok=True)


def _restore_and_check(vm: Vm, snapshot: Snapshot, saved: SavedMachine, timeout: float) -> None:
    share = saved.shared_memory
    vm.generation, line = restore_line(share)

    def step(name: str) -> None:
        vm.restore_steps[name] = time.monotonic() - vm.launched_at

    with _monitor(vm) as monitor, _connect(saved.restore_socket, vm, 10) as port:
        step("monitor")
        port.sendall(line)
        vm.relay = start_relay(vm)
        checking = _Checking(vm, timeout)
        try:
            _load_state(vm, monitor, snapshot)
            step("running")
            if share:
                _hotplug_share(vm, monitor)
            reply = _read_line(port, vm, RESTORE_SECONDS, "the agent's answer to the restore")
            step("restored")
            if reply.get("restored") != vm.generation:
                raise VmError(f"the agent refused the restore: {reply.get('error', reply)}")
        except BaseException:
            stop_now(vm)  # which ends the Check too
            with contextlib.suppress(BaseException):
                checking.join()
            raise
    checking.join()


@contextlib.contextmanager
def restored(options: VmOptions, snapshot: Snapshot) -> Iterator[Vm]:
    """A guest restored from `snapshot`; stopped (and its run directory gone) on exit."""
    with run_directory(options.run_dir) as run_dir:
        vm = restore(options, snapshot, run_dir)
        try:
            yield vm
        finally:
            stop(vm)
