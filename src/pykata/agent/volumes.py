"""Volumes already mounted in the guest: usage, online resize, stale share mounts.

Paths must lie inside the agent's run directory, as storage mount points do.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .command import run
from .errors import FailedPrecondition, NotFound
from .storage import inside

log = logging.getLogger("pykata.agent.volumes")

MOUNTINFO = Path("/proc/self/mountinfo")
#: Filesystems that grow online, and how (the device, or the mount point, is the argument).
GROWERS = {"ext2": "resize2fs", "ext3": "resize2fs", "ext4": "resize2fs", "xfs": "xfs_growfs"}


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mounts() -> list[Mount]:
    found = []
    for line in MOUNTINFO.read_text().splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        found.append(Mount(_unescape(fields[4]), tail[0], _unescape(tail[1])))
    return found


def mount_at(path: Path) -> Mount:
    """The mount whose mount point is exactly `path` (the last one, if stacked)."""
    matches = [m for m in mounts() if m.point == str(path)]
    if not matches:
        raise FailedPrecondition(f"{path} is not a mount point")
    return matches[-1]


@dataclass(frozen=True)
class VolumeStats:
    bytes_total: int
    bytes_used: int
    bytes_available: int
    inodes_total: int
    inodes_used: int
    inodes_available: int


class Volumes:
    def __init__(self, root: Path, shared: Path) -> None:
        self.root = root
        self.shared = shared

    def _path(self, path: str) -> Path:
        resolved = inside(self.root, path, "volume_guest_path")
        if not resolved.exists():
            raise NotFound(f"volume_guest_path {path!r} does not exist")
        return resolved

    def stats(self, path: str) -> VolumeStats:
        st = os.statvfs(self._path(path))
        return VolumeStats(
            bytes_total=st.f_blocks * st.f_frsize,
            bytes_used=(st.f_blocks - st.f_bfree) * st.f_frsize,
            bytes_available=st.f_bavail * st.f_frsize,
            inodes_total=st.f_files,
            inodes_used=st.f_files - st.f_ffree,
            inodes_available=st.f_favail,
        )

    async def resize(self, path: str, size: int) -> None:
        """Grow the filesystem mounted at `path` to fill its (already grown) device."""
        point = self._path(path)
        mount = mount_at(point)
        tool = GROWERS.get(mount.fstype)
        if tool is None:
            raise FailedPrecondition(
                f"cannot resize {mount.fstype} at {point}: only {', '.join(GROWERS)} grow online"
            )
        if tool == "resize2fs":
            await run(tool, mount.source, *([f"{size // 1024}K"] if size else []))
        else:
            await run(tool, str(point))
        log.info("volume resized", extra={"path": str(point), "fstype": mount.fstype})

    async def remove_stale_shares(self) -> list[str]:
        """Unmount share mounts below the shared directory whose backend is gone."""
        removed = []
        shared = os.path.realpath(self.shared)
        for mount in mounts():
            if not mount.point.startswith(shared + "/"):
                continue
            try:
                os.stat(mount.point)
            except OSError as exc:
                if exc.errno not in (errno.ESTALE, errno.ENOTCONN, errno.EIO):
                    continue
                await run("umount", "--lazy", mount.point)
                removed.append(mount.point)
        if removed:
            log.info("removed stale share mounts", extra={"mounts": removed})
        return removed
