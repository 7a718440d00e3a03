"""The agent as PID 1 of a guest: the file systems an init provides, and power-off.

As PID 1 the agent mounts a fresh /proc (its own PID namespace's), then
/sys, /dev, /dev/pts, /dev/shm, /run and the cgroup hierarchies the kernel
offers - v1 by controller, or v2 when `unified_cgroup_hierarchy` asks -
unless something (an initramfs) mounted them already. When it stops it
powers the machine off: PID 1 must never just exit (the kernel panics).
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
from pathlib import Path

from .. import log as logsetup
from .volumes import mounts

log = logging.getLogger("pykata.agent.init")

MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
RB_POWER_OFF = 0x4321FEDC
RB_DISABLE_CAD = 0
_libc = ctypes.CDLL(None, use_errno=True)

#: (source, target, fstype, flags, options), in mounting order.
BASICS = (
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666"),
    ("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
)
CGROUP_ROOT = "/sys/fs/cgroup"
#: PATH for the agent as init (the kernel gives init none), as upstream's agent sets it.
INIT_PATH = "/bin:/sbin:/usr/bin:/usr/sbin"


def mount(source: str, target: str, fstype: str, flags: int = 0, options: str = "") -> None:
    Path(target).mkdir(parents=True, exist_ok=True)
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, options.encode()):
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} on {target}: {os.strerror(err)}")


def mount_proc() -> None:
    """A fresh /proc, first of all (the kernel command line is read from it).

    Always fresh: one inherited from an initramfs or a parent namespace would
    show another PID namespace's processes.
    """
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def setup(unified_cgroups: bool) -> list[str]:
    """Mount the rest of what an init mounts; the mount points done (mounted ones skipped)."""
    done: list[str] = []
    mounted = {m.point for m in mounts()}
    for source, target, fstype, flags, options in BASICS:
        if target not in mounted:
            mount(source, target, fstype, flags, options)
            done.append(target)
    done += _cgroups(unified_cgroups, mounted)
    log.info("init mounts", extra={"mounted": done})
    return done


def _cgroups(unified: bool, mounted: set[str]) -> list[str]:
    if CGROUP_ROOT in mounted:
        return []
    if unified:
        mount("cgroup2", CGROUP_ROOT, "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        return [CGROUP_ROOT]
    mount("tmpfs", CGROUP_ROOT, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=755")
    done = [CGROUP_ROOT]
    for controllers in v1_hierarchies():
        target = f"{CGROUP_ROOT}/{','.join(controllers)}"
        mount("cgroup", target, "cgroup", MS_NOSUID | MS_NODEV | MS_NOEXEC, ",".join(controllers))
        done.append(target)
    return done


def v1_hierarchies() -> list[list[str]]:
    """Enabled v1 controllers, grouped as the kernel co-mounts them (/proc/cgroups)."""
    groups: dict[int, list[str]] = {}
    for line in Path("/proc/cgroups").read_text().splitlines()[1:]:
        name, hierarchy, _, enabled = line.split()
        if enabled == "1":
            groups.setdefault(int(hierarchy) or -len(groups) - 1, []).append(name)
    return list(groups.values())


#: Kernel modules each address form needs in a guest (the rest are built in).
TRANSPORT_MODULES = {"serial": "virtio_console", "vsock": "vmw_vsock_virtio_transport"}


def modules_for(addresses: list[str]) -> list[str]:
    """The modules the agent's channels need, in first-needed order."""
    wanted: list[str] = []
    for address in addresses:
        module = TRANSPORT_MODULES.get(address.partition("://")[0])
        if module and module not in wanted:
            wanted.append(module)
    return wanted


def load_modules(names: list[str]) -> list[str]:
    """modprobe each; the ones that failed (logged) are returned."""
    failed = []
    for name in names:
        try:
            result = subprocess.run(["modprobe", name], capture_output=True, text=True)
        except OSError as exc:
            log.error("modprobe %s failed: %s", name, exc)
            failed.append(name)
            continue
        if result.returncode:
            log.error("modprobe %s failed: %s", name, result.stderr.strip())
            failed.append(name)
    log.info("kernel modules", extra={"loaded": [n for n in names if n not in failed]})
    return failed


def soft_ctrl_alt_del() -> None:
    """Ctrl-Alt-Del becomes SIGINT to us (a clean shutdown) instead of an instant reboot.

    This is how the host asks the guest to stop (QMP send-key). Refused in a
    child PID namespace, where there is no keyboard to press anyway.
    """
    if _libc.reboot(RB_DISABLE_CAD):
        log.debug("Ctrl-Alt-Del left as it was: %s", os.strerror(ctypes.get_errno()))


def power_off() -> None:
    """Flush the disks and power off (in a child PID namespace: end the namespace)."""
    log.info("powering off")
    logsetup.flush()  # the lines written by the log thread, before the machine goes
    os.sync()
    _libc.reboot(RB_POWER_OFF)
    os._exit(1)  # reboot() refused (no CAP_SYS_BOOT): at least do not linger
