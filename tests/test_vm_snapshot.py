"""Guests restored from a snapshot (docs/vm.md, Snapshots): real QEMU under TCG.

One snapshot (made once per image, cached in the image's directory) serves the
module. Each restored guest must be a new guest: its own entropy and the right
time, though all were saved as the same machine. Nothing is mocked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from pykata.vm import image as image_mod
from pykata.vm import qemu, snapshot

from .containers import build_rootfs
from .peers import processes_with
from .vmguest import guest_options

pytestmark = pytest.mark.vm
CTL = [sys.executable, "-m", "pykata.ctl.cli"]


def options(guest_image: image_mod.GuestImage, **given: object) -> qemu.VmOptions:
    return guest_options(guest_image, **given)


@pytest.fixture(scope="module")
def saved(guest_snapshot: snapshot.Snapshot) -> snapshot.Snapshot:
    return guest_snapshot  # the one tests/test_vm.py restores


def in_guest(vm: qemu.Vm, command: str) -> str:
    done = subprocess.run(
        [*CTL, "console", vm.console_address, "-c", command, "--timeout", "60"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def two_guests(
    guest_image: image_mod.GuestImage, saved: snapshot.Snapshot
) -> Iterator[list[qemu.Vm]]:
    with ExitStack() as stack:
        vms = [stack.enter_context(snapshot.restored(options(guest_image), saved)) for _ in "ab"]
        yield vms
        # Both power off at once (each takes seconds under emulation); exiting then
        # finds them stopped.
        stopping = [threading.Thread(target=qemu.stop, args=(vm,)) for vm in vms]
        for thread in stopping:
            thread.start()
        for thread in stopping:
            thread.join()


def test_guests_restored_together_are_new_guests(two_guests: list[qemu.Vm]) -> None:
    first, second = two_guests
    assert first.generation != second.generation
    # Saved as one machine, each has its own entropy now...
    noise = [
        in_guest(vm, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'") for vm in two_guests
    ]
    assert len(noise[0]) == 64 and noise[0] != noise[1]
    uuids = [in_guest(vm, "cat /proc/sys/kernel/random/uuid") for vm in two_guests]
    assert uuids[0] != uuids[1]
    # The kernel makes its boot id at its first reading: none before the snapshot.
    boot_ids = [in_guest(vm, "cat /proc/sys/kernel/random/boot_id") for vm in two_guests]
    assert len(set(boot_ids)) == 2, boot_ids
    # ... and the host's time, not the snapshot's.
    for vm in two_guests:
        assert abs(int(in_guest(vm, "date +%s")) - time.time()) < 30
    # The agent was told before it answered anything: its log says restored, then serving.
    log = first.console_log.read_text(errors="replace")
    assert log.index('"restored"') < log.index('"agent serving"'), log[-2000:]


def test_snapshot_for_other_options_is_refused_naming_the_difference(
    guest_image: image_mod.GuestImage, saved: snapshot.Snapshot
) -> None:
    with (
        pytest.raises(qemu.VmError, match=r"cpus 2 \(asked: 1\)"),
        snapshot.restored(options(guest_image, cpus=1), saved),
    ):
        pass


def guest_args(saved: snapshot.Snapshot, bundle: Path, tmp: Path) -> list[str]:
    """kata-agent-ctl's options for the tests' guest (vmguest.py) restored with a share."""
    return [
        "--accel", "tcg", "--debug-console", "--cpus", "2", "--kernel-params", "maxcpus=1",
        "--trace-socket", str(tmp / "trace.sock"),
        "--from-snapshot", str(saved.directory), "--bundle-dir", str(bundle),
    ]  # fmt: skip


def ctl_restore(
    saved: snapshot.Snapshot, bundle: Path, tmp: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CTL, "connect", "--vm", "qemu", *guest_args(saved, bundle, tmp),
         "-c", "run /bin/cat /marker",
         "-c", "run /bin/sh -c 'echo from the guest > /written; exit 7'"],
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(tmp)},  # a short path for the sockets
    )  # fmt: skip


def test_ctl_restores_runs_a_container_from_a_shared_bundle_and_stops(
    saved: snapshot.Snapshot, tmp_path: Path
) -> None:
    """The share is hotplugged after the restore (virtio-fs cannot be migrated)."""
    rootfs = build_rootfs(tmp_path / "bundle" / "rootfs")
    (rootfs / "marker").write_text("from the host\n")
    short = Path(tempfile.mkdtemp(prefix="pykata-snap-"))
    try:
        done = ctl_restore(saved, tmp_path / "bundle", short)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert done.returncode == 7, done.stdout + done.stderr  # the container's, restored too
    assert "restored from" in done.stderr and "from the host" in done.stdout
    assert (rootfs / "written").read_text() == "from the guest\n"
    assert "guest stopped: powered off" in done.stderr
    assert processes_with("qemu-system", str(short)) == []
    assert processes_with("virtiofsd", str(short)) == []


def test_a_memory_copy_left_by_a_killed_launcher_goes_at_the_next_restore(
    guest_image: image_mod.GuestImage, saved: snapshot.Snapshot, tmp_path: Path
) -> None:
    """A guest restored with a share has a private copy of the memory in /dev/shm,
    which its launcher removes; one SIGKILLed first cannot, so the next restore does."""
    build_rootfs(tmp_path / "bundle" / "rootfs")
    short = Path(tempfile.mkdtemp(prefix="pykata-snap-"))
    try:
        launcher = subprocess.Popen(
            [*CTL, "vm", *guest_args(saved, tmp_path / "bundle", short)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "TMPDIR": str(short)},
        )  # fmt: skip
        with launcher:
            mine = f"{snapshot.PRIVATE_MEMORY_PREFIX}{launcher.pid}-*"
            deadline = time.monotonic() + 120  # a bound on a hang, not a measure
            while not (left := list(snapshot.PRIVATE_MEMORY_DIR.glob(mine))):
                assert launcher.poll() is None, launcher.communicate()[1]
                assert time.monotonic() < deadline, "no memory copy named after its launcher"
                time.sleep(0.005)
            launcher.kill()  # SIGKILL, while it copies the memory or restores
            launcher.communicate()
        assert all(path.exists() for path in left)  # what it could not remove
        with snapshot.restored(options(guest_image), saved) as vm:
            assert vm.generation
        assert not any(path.exists() for path in left)
    finally:
        shutil.rmtree(short, ignore_errors=True)
