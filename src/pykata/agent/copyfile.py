"""CopyFile: the host writes files into the guest's shared-files directory.

Only below `<run_dir>/shared/containers/`, as upstream's agent at HEAD
(kata-containers src/agent/src/rpc.rs, KATA_GUEST_SHARE_DIR). The path is
walked one component at a time with `openat(O_NOFOLLOW)`, so no `..`,
absolute escape or symlink anywhere in it can lead outside, even if the
directory changes while we walk it.

A regular file arrives in one or more chunks at increasing offsets. The
chunks go to a hidden partial file next to the target; when the last byte
is in, the partial file gets its mode and owner and is renamed over the
target - nobody ever sees a half-written file. The partial file is created
anew (O_EXCL) by the first chunk and must still be that same, singly linked
file for every later one, so nothing planted at its name can redirect the
write; a copy that fails leaves no partial file. A directory (S_IFDIR in
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
        fd = self._partial(dir_fd, temp, req)
        try:
            self._write_chunk(fd, req)
            done = req.offset + len(req.data) == req.file_size
            if done:
                os.fchmod(fd, stat.S_IMODE(req.file_mode) or 0o644)
                os.fchown(fd, req.uid, req.gid)
                os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
            raise
        finally:
            os.close(fd)
        if done:
            os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    def _partial(self, dir_fd: int, temp: str, req: CopyRequest) -> int:
        """The partial file: new for the first chunk, the same one for the others."""
        flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        if req.offset == 0:
            free = os.fstatvfs(dir_fd)
            if req.file_size > free.f_bfree * free.f_frsize:
                raise FailedPrecondition(
                    f"CopyFile path {req.path!r}: file_size {req.file_size} is more than the "
                    f"{free.f_bfree * free.f_frsize} bytes free on its filesystem"
                )
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=dir_fd)  # an earlier copy's, or something planted
            return os.open(temp, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
        try:
            fd = os.open(temp, flags, dir_fd=dir_fd)
        except FileNotFoundError:
            raise FailedPrecondition(
                f"CopyFile path {req.path!r}: chunk at offset {req.offset}, but no copy of "
                "this file is in progress (the first chunk has offset 0)"
            ) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise FailedPrecondition(
                f"CopyFile path {req.path!r}: its partial file was replaced meanwhile"
            )
        return fd

    def _write_chunk(self, fd: int, req: CopyRequest) -> None:
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

    def remove_partials(self) -> int:
        """Remove partial files a previous agent left (at start); how many there were."""
        removed = 0
        for directory, _dirs, files in os.walk(self.root):
            for name in files:
                if name.startswith(PARTIAL_PREFIX):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(directory, name))
                        removed += 1
        return removed
