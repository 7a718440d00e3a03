"""Upload and Download: files of any size into and out of a container's
filesystem (or the shared directory), in chunks, with a SHA-256 of the whole
file, atomic on arrival and resumable.

An upload goes to a partial file next to the target, named after the
target and its size (`.pykata-partial-SIZE.NAME`), made anew and locked
while written; when the last byte is in and the checksum the client sends
matches ours, it gets its mode and owner, is synced and renamed over the
target - nobody sees a half-written file. A stream that breaks leaves the
partial file; an upload of the same target and size with `resume` goes on
from its end (its bytes are hashed again first). Paths resolve inside the
root (inroot.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import os
import stat
from collections.abc import Iterator

from ..api import extensions_pb2 as ext
from ..extensions.wire import data_tag
from ..ttrpc import Code
from .channel import Channel
from .errors import AgentError, FailedPrecondition, InvalidArgument, LimitExceeded
from .inroot import check_path, open_in, open_parent
from .partials import PARTIAL_PREFIX, PartialNotes

#: Bytes hashed per step when a resumed transfer re-reads what it has.
HASH_STEP = 1 << 20
DATA_TAG = data_tag(ext.DownloadOutput, "data")


class ChecksumMismatch(AgentError):
    code = Code.DATA_LOSS


class Transfers:
    """Every upload and download open now, all connections together (bounded)."""

    def __init__(self, limit: int, chunk: int, notes: PartialNotes) -> None:
        self.limit = limit
        self.chunk = chunk
        self.notes = notes
        self.open = 0

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        if self.open >= self.limit:
            raise LimitExceeded(f"too many uploads and downloads open (limit {self.limit})")
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1

    async def upload(
        self, channel: Channel[ext.UploadInput], root: Root, request: ext.UploadOpen
    ) -> None:
        if request.mode & ~0o7777:
            raise InvalidArgument(f"mode {request.mode:o} has bits other than permissions")
        with self._slot():
            root_fd, root_path = root
            parent, name = open_parent(root_fd, request.file.path)
            try:
                partial = _partial_name(name, request.size)
                inside = "/".join(["", *check_path(request.file.path)[:-1], partial])
                note = _Note(self.notes, root_path, inside)
                await _Upload(channel, parent, name, request, self.chunk, note).run()
            finally:
                os.close(parent)

    async def download(
        self, channel: Channel[ext.DownloadInput], root: Root, request: ext.DownloadOpen
    ) -> None:
        with self._slot():
            fd = open_in(root[0], request.file.path, os.O_RDONLY)
            try:
                await _download(channel, fd, request, self.chunk)
            finally:
                os.close(fd)


#: A root: (an O_PATH fd of it, its path as the agent sees it, for the notes).
Root = tuple[int, str]


@dataclasses.dataclass(frozen=True)
class _Note:
    """Where an upload's partial file is, for an agent started after this one died."""

    notes: PartialNotes
    root: str
    path: str

    def record(self) -> None:
        self.notes.record(self.root, self.path)

    def forget(self) -> None:
        self.notes.forget(self.root, self.path)


def _partial_name(name: str, size: int) -> str:
    partial = f"{PARTIAL_PREFIX}{size}.{name}"
    if len(partial.encode(errors="surrogateescape")) > 255:
        digest = hashlib.sha256(name.encode(errors="surrogateescape")).hexdigest()[:32]
        partial = f"{PARTIAL_PREFIX}{size}.{digest}"
    return partial


class _Upload:
    def __init__(
        self,
        channel: Channel[ext.UploadInput],
        parent: int,
        name: str,
        request: ext.UploadOpen,
        chunk: int,
        note: _Note,
    ) -> None:
        self.channel = channel
        self.note = note
        self.parent = parent
        self.name = name
        self.request = request
        self.chunk = chunk
        self.path = request.file.path
        self.partial = _partial_name(name, request.size)
        self.hash = hashlib.sha256()
        self.offset = 0

    async def run(self) -> None:
        fd = await asyncio.to_thread(self._open_partial)
        try:
            self.channel.send(ext.UploadOutput(ready=True, offset=self.offset))
            digest = await self._receive(fd)
            await asyncio.to_thread(self._commit, fd, digest)
        finally:
            os.close(fd)  # also releases the lock
        self.channel.send(ext.UploadOutput(committed=True, sha256=digest))

    def _open_partial(self) -> int:
        """The partial file, locked: a new one, or with `resume` the one a broken
        upload left (hashed again up to its end)."""
        self.note.record()  # before the file exists: a crash may come at any point
        try:
            fd = self._open_or_make(os.O_RDWR | os.O_NOFOLLOW)
        except BaseException:
            if not self._partial_exists():
                self.note.forget()
            raise
        try:
            self._check_partial(fd)
            self.offset = os.fstat(fd).st_size
            for start in range(0, self.offset, HASH_STEP):
                self.hash.update(os.pread(fd, min(HASH_STEP, self.offset - start), start))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _partial_exists(self) -> bool:
        try:
            os.stat(self.partial, dir_fd=self.parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def _open_or_make(self, flags: int) -> int:
        fd = -1
        if self.request.resume:
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(self.partial, flags | os.O_CLOEXEC, dir_fd=self.parent)
        if fd < 0:
            free = os.fstatvfs(self.parent)
            if self.request.size > free.f_bavail * free.f_frsize:
                raise FailedPrecondition(
                    f"{self.path}: {self.request.size} bytes are more than the "
                    f"{free.f_bavail * free.f_frsize} free on its filesystem"
                )
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.partial, dir_fd=self.parent)
            fd = os.open(
                self.partial,
                flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                0o600,
                dir_fd=self.parent,
            )
        return fd

    def _check_partial(self, fd: int) -> None:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > self.request.size:
            raise FailedPrecondition(f"{self.path}: its partial file is not ours any more")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FailedPrecondition(f"{self.path}: another upload of it is in progress") from None

    async def _receive(self, fd: int) -> bytes:
        """Chunks until the client's checksum; ours, if it matches."""
        channel = self.channel
        while True:
            message = await channel.recv()
            if message is None:
                raise InvalidArgument(
                    f"{self.path}: the client closed the stream at byte {self.offset} of "
                    f"{self.request.size} (the partial file is kept for a resume)"
                )
            if message.data:
                size = len(message.data)
                if size > self.chunk:
                    raise InvalidArgument(f"a chunk of {size} bytes is over {self.chunk}")
                if self.offset + size > self.request.size:
                    raise InvalidArgument(
                        f"{self.path}: data past the size of {self.request.size} bytes"
                    )
                await asyncio.to_thread(self._write, fd, message.data)
                channel.consumed(size, lambda ack: ext.UploadOutput(ack=ack))
            if message.sha256:
                return self._verify(fd, message.sha256)

    def _write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, self.offset)
            view = view[written:]
            self.offset += written
        self.hash.update(data)

    def _verify(self, fd: int, theirs: bytes) -> bytes:
        if self.offset != self.request.size:
            raise InvalidArgument(
                f"{self.path}: checksum after {self.offset} of {self.request.size} bytes"
            )
        ours = self.hash.digest()
        if ours != theirs:
            os.unlink(self.partial, dir_fd=self.parent)
            self.note.forget()
            raise ChecksumMismatch(
                f"{self.path}: SHA-256 {ours.hex()} of what arrived is not the client's "
                f"{theirs.hex()}; the partial file is removed"
            )
        return ours

    def _commit(self, fd: int, digest: bytes) -> None:
        os.fchmod(fd, self.request.mode or 0o644)
        os.fchown(fd, self.request.uid, self.request.gid)
        os.fsync(fd)
        os.rename(self.partial, self.name, src_dir_fd=self.parent, dst_dir_fd=self.parent)
        self.note.forget()


async def _download(
    channel: Channel[ext.DownloadInput], fd: int, request: ext.DownloadOpen, chunk: int
) -> None:
    st = os.fstat(fd)
    path = request.file.path
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"{path} is not a regular file")
    size = st.st_size
    if request.offset > size:
        raise InvalidArgument(f"{path}: offset {request.offset} is past its end ({size} bytes)")
    digest = hashlib.sha256()
    channel.send(ext.DownloadOutput(ready=True, size=size, mode=stat.S_IMODE(st.st_mode)))

    def hash_prefix() -> None:
        for start in range(0, request.offset, HASH_STEP):
            digest.update(os.pread(fd, min(HASH_STEP, request.offset - start), start))

    await asyncio.to_thread(hash_prefix)

    def read(offset: int) -> bytes:
        data = os.pread(fd, min(chunk, size - offset), offset)
        digest.update(data)
        return data

    acks = asyncio.ensure_future(_take_acks(channel, path))
    try:
        offset = request.offset
        while offset < size:
            data = await asyncio.to_thread(read, offset)
            if not data:
                raise FailedPrecondition(f"{path} shrank to {offset} bytes while being read")
            await channel.send_window.reserve(len(data))
            channel.send_data(DATA_TAG, data)
            offset += len(data)
        channel.send(ext.DownloadOutput(sha256=digest.digest()))
        await acks  # the client closes its side when it has everything
    finally:
        acks.cancel()
        with contextlib.suppress(BaseException):
            await acks


async def _take_acks(channel: Channel[ext.DownloadInput], path: str) -> None:
    try:
        while await channel.recv() is not None:
            pass  # acks: the channel applies them as they arrive
    except Exception as exc:
        channel.send_window.close(exc)
        raise
    # Done, or given up: a sender waiting for room would wait for ever.
    channel.send_window.close(
        InvalidArgument(f"{path}: the client closed the stream before the end")
    )
