"""Storages: filesystems the runtime asks the agent to provide (local, bind, tmpfs,
overlay, and in a guest virtio-fs: a host directory shared by the VMM).

Every mount point must lie inside the agent's run directory, after
resolving symlinks, and never on the agent's own state there (the run
directory itself, the runtime's state, the bundles, the sandbox's files):
a request cannot make the agent mount over anything else. Mounts are
reference-counted by mount point (containers may share one) and undone
when the last user goes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from . import tracing
from .command import run
from .errors import FailedPrecondition, InvalidArgument, NotFound, Unsupported

log = logging.getLogger("pykata.agent.storage")

#: Directories of the run directory that hold the agent's own state (runtime, bundles).
AGENT_STATE = ("runtime", "containers")


@dataclass(frozen=True)
class StorageSpec:
    driver: str
    source: str
    fstype: str
    options: tuple[str, ...]
    mount_point: str


def inside(root: Path, path: str, what: str) -> Path:
    """`path`, checked to stay inside `root` once symlinks are resolved."""
    if not os.path.isabs(path):
        raise InvalidArgument(f"{what} {path!r} must be an absolute path")
    if ".." in Path(path).parts:
        raise InvalidArgument(f"{what} {path!r} must not contain '..'")
    real_root = Path(os.path.realpath(root))
    resolved = Path(os.path.realpath(path))
    if resolved != real_root and real_root not in resolved.parents:
        raise InvalidArgument(
            f"{what} {path!r} is outside the agent's directory {root} (it resolves to {resolved})"
        )
    return resolved


async def _mount(*args: str) -> None:
    await run("mount", *args)


async def _umount(path: Path) -> None:
    try:
        await run("umount", "--lazy", str(path))
    except FailedPrecondition as exc:
        log.warning("%s", exc)


# --- the drivers: each prepares `point` for its storage; True when it mounted there ---


def _options(spec: StorageSpec) -> list[str]:
    return ["-o", ",".join(spec.options)] if spec.options else []


async def _local(spec: StorageSpec, point: Path, owns_machine: bool) -> bool:
    mode = next((o[5:] for o in spec.options if o.startswith("mode=")), "0777")
    point.chmod(int(mode, 8))
    return False


async def _bind(spec: StorageSpec, point: Path, owns_machine: bool) -> bool:
    if not os.path.exists(spec.source):
        raise InvalidArgument(f"bind storage source {spec.source!r} does not exist")
    await _mount("--bind", spec.source, str(point))
    if "ro" in spec.options:
        await _mount("-o", "remount,bind,ro", str(point))
    return True


async def _ephemeral(spec: StorageSpec, point: Path, owns_machine: bool) -> bool:
    # mode= is a tmpfs option too (the runtime's shm storage sends mode=1777)
    await _mount("-t", "tmpfs", *_options(spec), spec.source or "tmpfs", str(point))
    return True


async def _virtio_fs(spec: StorageSpec, point: Path, owns_machine: bool) -> bool:
    # source: the VMM's tag for the shared directory (Kata's kataShared)
    if owns_machine:
        await run("modprobe", "virtiofs")
    await _mount("-t", "virtiofs", *_options(spec), spec.source, str(point))
    return True


async def _overlayfs(spec: StorageSpec, point: Path, owns_machine: bool) -> bool:
    for option in spec.options:
        key, _, value = option.partition("=")
        if key in ("upperdir", "workdir"):
            Path(value).mkdir(parents=True, exist_ok=True)
    await _mount("-t", "overlay", *_options(spec), spec.source or "overlay", str(point))
    return True


Handler = Callable[[StorageSpec, Path, bool], Awaitable[bool]]
#: driver -> what the agent does for it (upstream's STORAGE_HANDLERS).
HANDLERS: dict[str, Handler] = {
    "local": _local,
    "bind": _bind,
    "ephemeral": _ephemeral,
    "overlayfs": _overlayfs,
    "virtio-fs": _virtio_fs,
}
DRIVERS = tuple(HANDLERS)


class Storages:
    def __init__(self, root: Path, owns_machine: bool = False) -> None:
        self.root = root
        #: May load kernel modules (virtio-fs); only in a machine of our own.
        self.owns_machine = owns_machine
        self._users: dict[Path, int] = {}
        self._mounted: dict[Path, str] = {}  # mount point -> driver

    def check(self, spec: StorageSpec) -> None:
        """Refuse a storage before anything is done (unknown driver, bad paths)."""
        if spec.driver not in DRIVERS:
            raise Unsupported(
                f"storage driver {spec.driver!r} (for {spec.mount_point}) is not supported; "
                f"supported: {', '.join(DRIVERS)}"
            )
        self._usable(spec.mount_point, "storage mount_point")
        if spec.driver == "overlayfs":
            for option in spec.options:
                key, _, value = option.partition("=")
                if key in ("upperdir", "workdir"):
                    self._usable(value, f"overlay {key}")

    def _usable(self, path: str, what: str) -> Path:
        """`path` inside the run directory and clear of the agent's own state there."""
        resolved = inside(self.root, path, what)
        root = Path(os.path.realpath(self.root))
        if resolved in (root, root / "sandbox", root / "sandbox" / "resolv.conf"):
            raise InvalidArgument(f"{what} {path!r} would hide the agent's own files")
        for own in AGENT_STATE:
            if resolved == root / own or root / own in resolved.parents:
                raise InvalidArgument(
                    f"{what} {path!r} is inside the agent's own state ({root / own})"
                )
        return resolved

    async def add(self, spec: StorageSpec) -> Path:
        attributes = {"driver": spec.driver, "mount_point": spec.mount_point}
        with tracing.step("storage mount", attributes):
            return await self._add(spec)

    async def _add(self, spec: StorageSpec) -> Path:
        self.check(spec)
        self.root.mkdir(parents=True, exist_ok=True)
        point = self._usable(spec.mount_point, "storage mount_point")
        if point in self._users:
            self._users[point] += 1
            return point
        point.mkdir(parents=True, exist_ok=True)
        if await HANDLERS[spec.driver](spec, point, self.owns_machine):
            self._mounted[point] = spec.driver
        self._users[point] = 1
        log.info("storage mounted", extra={"driver": spec.driver, "mount_point": str(point)})
        return point

    async def release(self, point: Path) -> None:
        users = self._users.get(point, 0) - 1
        if users > 0:
            self._users[point] = users
            return
        self._users.pop(point, None)
        if point in self._mounted:
            del self._mounted[point]
            await _umount(point)
        with contextlib.suppress(OSError):
            point.rmdir()

    async def update_ephemeral(self, specs: list[StorageSpec]) -> None:
        """Remount mounted ephemeral storages with new options (a new size, say)."""
        points = []
        for spec in specs:
            if spec.driver != "ephemeral":
                raise InvalidArgument(
                    f"UpdateEphemeralMounts: storage {spec.mount_point} has driver "
                    f"{spec.driver!r}; only ephemeral storages can be updated"
                )
            point = inside(self.root, spec.mount_point, "storage mount_point")
            if self._mounted.get(point) != "ephemeral":
                raise NotFound(f"no ephemeral storage is mounted at {spec.mount_point}")
            points.append(point)
        for spec, point in zip(specs, points, strict=True):
            options = list(spec.options)
            await _mount("-o", ",".join(["remount", *options]), str(point))
            log.info("ephemeral storage updated", extra={"mount_point": str(point)})

    async def release_all(self) -> None:
        for point in list(self._users):
            self._users[point] = 1
            await self.release(point)
