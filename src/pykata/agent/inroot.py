"""Paths from the wire resolved inside a root directory, never outside it.

openat2(2) with RESOLVE_IN_ROOT resolves a path as if the root directory
were "/": "..", absolute symlinks and relative ones all stay inside,
whatever the container's filesystem holds and however it changes meanwhile
(the kernel checks every step). RESOLVE_NO_MAGICLINKS refuses /proc's
magic links (such as /proc/1/root), which would lead out; RESOLVE_NO_XDEV
is not set, so the container's own mounts are seen as the container sees
them. The last component of a path we create or replace is never followed:
we resolve its parent, then act on the name with *at calls and O_NOFOLLOW.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

from .errors import FailedPrecondition, InvalidArgument

# linux/openat2.h
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437, "ppc64le": 437, "s390x": 437}.get(
    platform.machine(), 437
)
_libc = ctypes.CDLL(None, use_errno=True)
#: Longest path accepted (PATH_MAX).
MAX_PATH = 4096


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dir_fd: int, path: str, flags: int, mode: int = 0, resolve: int = 0) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = _libc.syscall(
        _SYS_OPENAT2,
        ctypes.c_int(dir_fd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def check_path(path: str) -> list[str]:
    """The components of an absolute path from the wire; INVALID_ARGUMENT otherwise."""
    if not path.startswith("/"):
        raise InvalidArgument(f"path {path!r} must be absolute")
    if "\0" in path or len(path.encode(errors="surrogateescape")) > MAX_PATH:
        raise InvalidArgument(f"path {path[:100]!r} has a NUL byte or is longer than {MAX_PATH}")
    return [p for p in path.split("/") if p and p != "."]


def open_in(root_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """An fd of `path` (absolute, from the wire) inside the root `root_fd`."""
    check_path(path)
    try:
        return openat2(root_fd, path, flags, mode, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    except OSError as exc:
        raise _failure(path, exc) from None


def open_parent(root_fd: int, path: str) -> tuple[int, str]:
    """(an fd of the directory that holds `path`, the last component's name)."""
    parts = check_path(path)
    if not parts or parts[-1] == "..":
        raise InvalidArgument(f"path {path!r} names no file (it ends in '/' or '..')")
    parent = "/" + "/".join(parts[:-1])
    fd = open_in(root_fd, parent, os.O_PATH | os.O_DIRECTORY)
    return fd, parts[-1]


def _failure(path: str, exc: OSError) -> Exception:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return InvalidArgument(f"path {path!r}: {exc.strerror}")
    if exc.errno in (errno.ELOOP, errno.EXDEV):
        return InvalidArgument(f"path {path!r}: a symlink loop, or a /proc magic link")
    if exc.errno == errno.ENOSYS:
        return FailedPrecondition("the kernel has no openat2 (Linux 5.6 or later is needed)")
    return FailedPrecondition(f"path {path!r}: {exc.strerror}")
