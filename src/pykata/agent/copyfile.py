"""CopyFile: the host writes files into the guest's shared-files directory.

Only below `<run_dir>/shared` (upstream allows all of /run/kata-containers,
which would let a caller rewrite the agent's own bundles and runtime state).
The path is walked one component at a time with `openat(O_NOFOLLOW)`, so
no `..`, absolute escape or symlink anywhere in it can lead outside, even
if the directory changes while we walk it.

A regular file arrives in one or more chunks at increasing offsets. The
chunks go to a hidden partial file next to the target; when the last byte
is in, the partial file gets its mode and owner and is renamed over the
target - nobody ever sees a half-written file. A directory (S_IFDIR in
file_mode) is created; a symlink (S_IFLNK) is created with `data` as its
target (it is never followed later: see above).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import FailedPrecondition, InvalidArgument

PARTIAL_PREFIX = ".pykata-partial-"


@dataclass(frozen=True)
class CopyRequest:
    path: str
    file_size: int
    file_mode: int
    dir_mode: int
    uid: int
    gid: int
    offset: int
    data: bytes


class SharedFiles:
    """The directory CopyFile may write to."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _parts(self, path: str) -> list[str]:
        """The components of `path` below the root; refuses anything else."""
        if not os.path.isabs(path):
            raise InvalidArgument(f"CopyFile path {path!r} must be absolute")
        parts = [p for p in path.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise InvalidArgument(f"CopyFile path {path!r} may not contain '.' or '..'")
        root = [p for p in str(self.root).split("/") if p]
        if parts[: len(root)] != root or len(parts) == len(root):
            raise InvalidArgument(
                f"CopyFile path {path!r} is outside the shared-files directory {self.root}/"
            )
        return parts[len(root) :]

    @contextlib.contextmanager
    def _parent(self, parts: list[str], req: CopyRequest) -> Iterator[int]:
        """An fd of the target's parent directory, creating missing ones with dir_mode."""
        self.root.mkdir(mode=0o750, parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for name in parts[:-1]:
                created = False
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=fd)
                    created = True
                try:
                    child = os.open(name, os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except OSError as exc:
                    raise InvalidArgument(
                        f"CopyFile path {req.path!r}: {name!r} is not a directory "
                        f"(symlinks are not followed): {exc.strerror}"
                    ) from None
                os.close(fd)
                fd = child
                if created:  # the requested mode exactly, whatever the umask
                    os.fchmod(fd, stat.S_IMODE(req.dir_mode) or 0o755)
                    os.fchown(fd, req.uid, req.gid)
            yield fd
        finally:
            os.close(fd)

    def copy(self, req: CopyRequest) -> None:
        parts = self._parts(req.path)
        try:
            self._copy(parts, req)
        except OSError as exc:
            raise FailedPrecondition(f"CopyFile {req.path!r}: {exc.strerror}") from None

    def _copy(self, parts: list[str], req: CopyRequest) -> None:
        kind = stat.S_IFMT(req.file_mode)
        with self._parent(parts, req) as dir_fd:
            name = parts[-1]
            if kind == stat.S_IFDIR:
                self._directory(dir_fd, name, req)
            elif kind == stat.S_IFLNK:
                self._symlink(dir_fd, name, req)
            elif kind in (0, stat.S_IFREG):
                self._chunk(dir_fd, name, req)
            else:
                raise InvalidArgument(
                    f"CopyFile path {req.path!r}: file_mode {req.file_mode:o} is not a regular "
                    "file, directory or symlink"
                )

    def _directory(self, dir_fd: int, name: str, req: CopyRequest) -> None:
        try:
            os.mkdir(name, stat.S_IMODE(req.file_mode), dir_fd=dir_fd)
        except FileExistsError:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                msg = f"CopyFile path {req.path!r} exists and is not a directory"
                raise InvalidArgument(msg) from None
        fd = os.open(name, os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            os.fchmod(fd, stat.S_IMODE(req.file_mode))
            os.fchown(fd, req.uid, req.gid)
        finally:
            os.close(fd)

    def _symlink(self, dir_fd: int, name: str, req: CopyRequest) -> None:
        target = req.data.decode(errors="surrogateescape")
        if not target:
            raise InvalidArgument(f"CopyFile path {req.path!r}: a symlink needs its target in data")
        temp = PARTIAL_PREFIX + name
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=dir_fd)
        os.symlink(target, temp, dir_fd=dir_fd)
        os.chown(temp, req.uid, req.gid, dir_fd=dir_fd, follow_symlinks=False)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    def _chunk(self, dir_fd: int, name: str, req: CopyRequest) -> None:
        if req.file_size < 0 or req.offset < 0:
            raise InvalidArgument(
                f"CopyFile path {req.path!r}: file_size and offset must not be negative"
            )
        if req.offset + len(req.data) > req.file_size:
            raise InvalidArgument(
                f"CopyFile path {req.path!r}: chunk at offset {req.offset} with "
                f"{len(req.data)} bytes goes past file_size {req.file_size}"
            )
        temp = PARTIAL_PREFIX + name
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        if req.offset == 0:
            flags |= os.O_TRUNC
        fd = os.open(temp, flags, 0o600, dir_fd=dir_fd)
        try:
            size = os.fstat(fd).st_size
            if req.offset != size:
                raise FailedPrecondition(
                    f"CopyFile path {req.path!r}: chunk at offset {req.offset}, but "
                    f"{size} bytes have arrived so far (send the chunks in order)"
                )
            view = memoryview(req.data)
            while view:
                written = os.pwrite(fd, view, req.offset + len(req.data) - len(view))
                view = view[written:]
            if req.offset + len(req.data) < req.file_size:
                return  # more chunks to come
            os.fchmod(fd, stat.S_IMODE(req.file_mode) or 0o644)
            os.fchown(fd, req.uid, req.gid)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
