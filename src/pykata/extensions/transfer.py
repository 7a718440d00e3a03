"""The client end of Upload and Download: a local file to or from a path in a
container (or the shared directory), resumable, checked with SHA-256.

A download arrives in `DEST.pykata-partial` and is renamed to DEST once its
checksum matches the agent's; a broken download leaves the partial file,
and the next one (with resume) asks only for the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from ..api import extensions_pb2 as ext
from .client import Channel, Extensions, Piece, ProtocolError
from .wire import data_tag

#: Called with (bytes done, bytes in all) as a transfer goes.
Progress = Callable[[int, int], None]
PARTIAL_SUFFIX = ".pykata-partial"
HASH_STEP = 1 << 20
UPLOAD_DATA_TAG = data_tag(ext.UploadInput, "data")


def _no_progress(done: int, total: int) -> None:
    pass


async def _hash_prefix(fd: int, length: int) -> hashlib._Hash:
    digest = hashlib.sha256()

    def run() -> None:
        for start in range(0, length, HASH_STEP):
            digest.update(os.pread(fd, min(HASH_STEP, length - start), start))

    await asyncio.to_thread(run)
    return digest


async def upload(
    extensions: Extensions,
    source: Path,
    location: ext.FileLocation,
    *,
    mode: int | None = None,
    resume: bool = True,
    progress: Progress = _no_progress,
) -> bytes:
    """Send `source` to `location`; the SHA-256 the agent committed it with."""
    caps = await extensions.require("Upload")
    chunk = caps.limits.max_chunk_bytes
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        channel = await extensions.open("Upload", ext.UploadOutput)
        request = ext.UploadOpen(
            file=location,
            size=st.st_size,
            mode=(st.st_mode & 0o7777) if mode is None else mode,
            resume=resume,
        )
        channel.send(ext.UploadInput(open=request))
        try:
            return await _send_file(channel, fd, st.st_size, chunk, progress)
        finally:
            channel.abort()
    finally:
        os.close(fd)


async def _send_file(
    channel: Channel[ext.UploadOutput], fd: int, size: int, chunk: int, progress: Progress
) -> bytes:
    ready = await channel.first(ext.UploadOutput, "ready")
    if ready.offset > size:
        raise ProtocolError(f"Upload's first answer is past the file's end: {ready}")
    digest = await _hash_prefix(fd, ready.offset)
    answers = asyncio.ensure_future(_upload_answers(channel))
    try:
        offset = ready.offset
        progress(offset, size)
        while offset < size:
            data = await asyncio.to_thread(os.pread, fd, min(chunk, size - offset), offset)
            if not data:
                raise ProtocolError(f"the local file shrank to {offset} bytes while being sent")
            digest.update(data)
            await channel.send_window.reserve(len(data))
            channel.send_data(UPLOAD_DATA_TAG, data)
            offset += len(data)
            progress(offset, size)
        channel.send(ext.UploadInput(sha256=digest.digest()))
        committed = await answers
    finally:
        answers.cancel()
        with contextlib.suppress(BaseException):
            await answers
    if committed != digest.digest():
        raise ProtocolError("the agent committed the file with another checksum")
    channel.close_send()
    await channel.finish()
    return committed


async def _upload_answers(channel: Channel[ext.UploadOutput]) -> bytes:
    """Acks, until the agent says the file is in place: its checksum."""
    try:
        while True:
            answer = await channel.recv()
            if answer is None:
                await channel.finish()  # raises the agent's error
                raise ProtocolError("Upload ended before the file was committed")
            if answer.committed:  # (acks: the channel applies them as they arrive)
                return answer.sha256
    except BaseException as exc:
        channel.send_window.close(exc if isinstance(exc, Exception) else ProtocolError("stopped"))
        raise


async def download(
    extensions: Extensions,
    location: ext.FileLocation,
    dest: Path,
    *,
    resume: bool = True,
    progress: Progress = _no_progress,
) -> bytes:
    """Fetch `location` into `dest` (atomically); its SHA-256."""
    await extensions.require("Download")
    partial = dest.with_name(dest.name + PARTIAL_SUFFIX)
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if resume else os.O_TRUNC)
    fd = os.open(partial, flags, 0o600)
    try:
        offset = os.fstat(fd).st_size
        channel = await extensions.open_data("Download", ext.DownloadOutput)
        channel.send(ext.DownloadInput(open=ext.DownloadOpen(file=location, offset=offset)))
        try:
            ready = await channel.first(ext.DownloadOutput, "ready")
            digest = await _hash_prefix(fd, offset)
            await _receive_file(channel, fd, offset, ready.size, digest, progress)
        finally:
            channel.abort()
        os.fchmod(fd, ready.mode or 0o644)
        await asyncio.to_thread(os.fsync, fd)
    finally:
        os.close(fd)
    os.rename(partial, dest)
    return digest.digest()


async def _receive_file(
    channel: Channel[ext.DownloadOutput | Piece],
    fd: int,
    offset: int,
    size: int,
    digest: hashlib._Hash,
    progress: Progress,
) -> None:
    progress(offset, size)
    while True:
        message = await channel.recv()
        if message is None:
            await channel.finish()
            raise ProtocolError("Download ended before its checksum")
        data = message.data
        if data:
            if offset + len(data) > size:
                raise ProtocolError("the agent sent more than the file's size")
            await asyncio.to_thread(_write_at, fd, data, offset)
            digest.update(data)
            offset += len(data)
            progress(offset, size)
            channel.consumed(len(data), lambda ack: ext.DownloadInput(ack=ack))
        if isinstance(message, Piece):
            continue
        if message.sha256:
            if offset != size or message.sha256 != digest.digest():
                os.ftruncate(fd, 0)  # a partial file that is wrong is no start for a resume
                raise ProtocolError(
                    f"checksum mismatch after {offset} of {size} bytes: the agent's "
                    f"{message.sha256.hex()}, ours {digest.hexdigest()}"
                )
            channel.close_send()
            await channel.finish()
            return


def _write_at(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
