"""QEMU and its helpers (virtiofsd) as processes: started so they die with their
launcher (PR_SET_PDEATHSIG), ended by force when asked."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from ..children import die_with_parent
from .channel import Channel
from .cmdline import QEMU, SavedMachine, qemu_command
from .errors import VmError
from .machine import VmOptions

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
#: What a launch leaves in the run directory; removed before the next one there.
RUN_FILES = (
    "console.log", "agent.sock", "agent-port.sock", "qmp.sock", "console.sock", "restore.sock",
)  # fmt: skip


def spawn(command: list[str], stderr: Path) -> subprocess.Popen[bytes]:
    with open(stderr, "wb") as errors:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            preexec_fn=die_with_parent(signal.SIGKILL),
            start_new_session=True,  # a Ctrl-C at the terminal is ours to handle, not theirs
        )


def start_virtiofsd(shared_dir: Path, run_dir: Path) -> subprocess.Popen[bytes]:
    """virtiofsd serving `shared_dir`, once its socket is there for QEMU to connect to."""
    if not os.access(VIRTIOFSD, os.X_OK):
        raise VmError(f"{VIRTIOFSD} is missing (it comes with qemu-system-common)")
    if not shared_dir.is_dir():
        raise VmError(f"cannot share {shared_dir} with the guest: not a directory")
    socket_path = run_dir / "virtiofsd.sock"
    socket_path.unlink(missing_ok=True)
    command = [VIRTIOFSD, f"--socket-path={socket_path}", "-o", f"source={shared_dir}",
               "-o", "cache=auto"]  # fmt: skip
    daemon = spawn(command, run_dir / "virtiofsd.stderr")
    deadline = time.monotonic() + 10
    while not socket_path.exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            daemon.kill()
            detail = (run_dir / "virtiofsd.stderr").read_text(errors="replace").strip()
            raise VmError(f"virtiofsd did not start: {detail[-500:] or 'no socket after 10s'}")
        time.sleep(0.02)
    return daemon


def require_qemu() -> None:
    if shutil.which(QEMU) is None:
        raise VmError(f"{QEMU} is not installed (apt-get install qemu-system-x86)")


def clear_run_dir(run_dir: Path) -> None:
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)


def start(
    options: VmOptions,
    run_dir: Path,
    accel: str,
    channel: Channel,
    saved: SavedMachine | None = None,
) -> tuple[subprocess.Popen[bytes], list[subprocess.Popen[bytes]]]:
    """QEMU, and the helpers it needs (virtiofsd)."""
    require_qemu()
    clear_run_dir(run_dir)
    helpers = []
    if options.shared_dir is not None:
        helpers.append(start_virtiofsd(options.shared_dir, run_dir))
    try:
        command = qemu_command(options, run_dir, accel, channel, saved)
        return spawn(command, run_dir / "qemu.stderr"), helpers
    except BaseException:
        end(helpers)
        raise


def end(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()
