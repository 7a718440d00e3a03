"""Upload and Download: files of any size into and out of real containers,
byte-identical, atomic, resumable, never outside the container's root."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pykata.api import agent_pb2
from pykata.api import extensions_pb2 as ext
from pykata.extensions.client import Extensions, ProtocolError
from pykata.extensions.transfer import PARTIAL_SUFFIX, download, upload
from pykata.ttrpc import Client, Code, Stub, TtrpcError

from .conftest import AgentProcess
from .extensions import start_container

AGENT = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
CTL = [sys.executable, "-m", "pykata.ctl.cli"]
MiB = 1 << 20


@pytest.fixture
async def box(
    container_agent: AgentProcess, rootfs: Path, tmp_path: Path
) -> AsyncIterator[tuple[Extensions, Path]]:
    """A running container "box" and the directory /xfer-N inside it (as a host path)."""
    inside = rootfs / f"xfer-{os.getpid()}-{tmp_path.name}"
    inside.mkdir()
    async with await Client.connect(container_agent.address) as client:
        await start_container(Stub(client, AGENT), rootfs, "box", "/bin/sleep", "1000")
        try:
            yield Extensions(client), inside
        finally:
            subprocess.run(["rm", "-rf", str(inside)], check=False)


def at(inside: Path, name: str) -> ext.FileLocation:
    return ext.FileLocation(container_id="box", path=f"/{inside.name}/{name}")


def random_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).digest()


async def test_round_trip_with_mode_and_checksum(box: Any, tmp_path: Path) -> None:
    extensions, inside = box
    digest = random_file(tmp_path / "a", 3 * MiB + 17)
    committed = await upload(extensions, tmp_path / "a", at(inside, "a"), mode=0o750)
    assert committed == digest
    assert (inside / "a").read_bytes() == (tmp_path / "a").read_bytes()
    assert (inside / "a").stat().st_mode & 0o7777 == 0o750
    assert [p.name for p in inside.iterdir()] == ["a"]  # no partial file left
    got = await download(extensions, at(inside, "a"), tmp_path / "back")
    assert got == digest and (tmp_path / "back").read_bytes() == (tmp_path / "a").read_bytes()
    assert not (tmp_path / ("back" + PARTIAL_SUFFIX)).exists()
    # an empty file both ways
    (tmp_path / "empty").write_bytes(b"")
    await upload(extensions, tmp_path / "empty", at(inside, "empty"))
    await download(extensions, at(inside, "empty"), tmp_path / "empty-back")
    assert (inside / "empty").read_bytes() == b"" == (tmp_path / "empty-back").read_bytes()


async def test_the_shared_directory(box: Any, tmp_path: Path) -> None:
    extensions, _inside = box
    (tmp_path / "s").write_bytes(b"shared\n")
    where = ext.FileLocation(path="/s")
    await upload(extensions, tmp_path / "s", where)
    assert (tmp_path / "run" / "shared" / "containers" / "s").read_bytes() == b"shared\n"
    await download(extensions, where, tmp_path / "s2")
    assert (tmp_path / "s2").read_bytes() == b"shared\n"


async def test_the_target_changes_only_when_complete(box: Any, tmp_path: Path) -> None:
    extensions, inside = box
    (inside / "t").write_bytes(b"old")
    random_file(tmp_path / "t", 40 * MiB)
    seen: list[bytes] = []

    def progress(done: int, total: int) -> None:
        if 0 < done < total and not seen:
            seen.append((inside / "t").read_bytes())

    await upload(extensions, tmp_path / "t", at(inside, "t"), progress=progress)
    assert seen == [b"old"]
    assert (inside / "t").read_bytes() == (tmp_path / "t").read_bytes()


async def _broken_after(coroutine: Any, client: Client, nbytes: int, started: list[int]) -> None:
    """Run a transfer and drop the connection once `nbytes` have moved."""

    def progress(done: int, total: int) -> None:
        if not started:
            started.append(done)
        if done >= nbytes and client._transport is not None:
            client._transport.abort()

    with pytest.raises((TtrpcError, ProtocolError)):
        await coroutine(progress)


async def test_uploads_and_downloads_resume_after_a_broken_connection(
    box: Any, tmp_path: Path, container_agent: AgentProcess
) -> None:
    _extensions, inside = box
    digest = random_file(tmp_path / "r", 48 * MiB)
    started: list[int] = []
    async with await Client.connect(container_agent.address) as first:
        ext1 = Extensions(first)
        await _broken_after(
            lambda p: upload(ext1, tmp_path / "r", at(inside, "r"), progress=p),
            first,
            16 * MiB,
            started,
        )
    assert not (inside / "r").exists()
    partials = [p for p in inside.iterdir() if p.name.startswith(".pykata-partial-")]
    assert len(partials) == 1 and partials[0].stat().st_size >= 8 * MiB
    started.clear()
    async with await Client.connect(container_agent.address) as second:
        ext2 = Extensions(second)
        await upload(ext2, tmp_path / "r", at(inside, "r"), progress=lambda d, t: started.append(d))
    assert started[0] >= 8 * MiB  # went on from the partial file
    assert hashlib.sha256((inside / "r").read_bytes()).digest() == digest
    assert [p.name for p in inside.iterdir()] == ["r"]
    # Where its partial file was is forgotten with it (partials.py).
    assert list((tmp_path / "run" / "uploads").iterdir()) == []

    started.clear()
    async with await Client.connect(container_agent.address) as third:
        ext3 = Extensions(third)
        await _broken_after(
            lambda p: download(ext3, at(inside, "r"), tmp_path / "rback", progress=p),
            third,
            16 * MiB,
            started,
        )
    assert (tmp_path / ("rback" + PARTIAL_SUFFIX)).stat().st_size >= 8 * MiB
    started.clear()
    async with await Client.connect(container_agent.address) as fourth:
        ext4 = Extensions(fourth)
        got = await download(
            ext4, at(inside, "r"), tmp_path / "rback", progress=lambda d, t: started.append(d)
        )
    assert started[0] >= 8 * MiB and got == digest
    assert hashlib.sha256((tmp_path / "rback").read_bytes()).digest() == digest


async def test_a_wrong_checksum_commits_nothing(box: Any, tmp_path: Path) -> None:
    extensions, inside = box
    (inside / "w").write_bytes(b"before")
    channel = await extensions.open("Upload", ext.UploadOutput)
    channel.send(ext.UploadInput(open=ext.UploadOpen(file=at(inside, "w"), size=5)))
    assert (await channel.recv()).ready  # type: ignore[union-attr]
    channel.send(ext.UploadInput(data=b"hello", sha256=hashlib.sha256(b"HELLO").digest()))
    with pytest.raises(TtrpcError) as failed:
        await channel.finish()
    assert failed.value.code == Code.DATA_LOSS and "SHA-256" in failed.value.message
    assert (inside / "w").read_bytes() == b"before"
    assert [p.name for p in inside.iterdir()] == ["w"]


async def test_paths_never_leave_the_container(box: Any, tmp_path: Path, rootfs: Path) -> None:
    extensions, inside = box
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret\n")
    # Symlinks planted in the container pointing at the host's directories.
    (inside / "abs").symlink_to(outside)
    (inside / "rel").symlink_to("../" * 30 + str(outside).lstrip("/"))
    (inside / "file-link").symlink_to(outside / "secret")
    (tmp_path / "payload").write_bytes(b"payload\n")
    for name in ("abs/planted", "rel/planted"):
        with pytest.raises(TtrpcError) as failed:
            await upload(extensions, tmp_path / "payload", at(inside, name))
        # the host's directory does not exist inside the container
        assert failed.value.code == Code.INVALID_ARGUMENT, failed.value
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    with pytest.raises(TtrpcError) as failed:
        await download(extensions, at(inside, "file-link"), tmp_path / "stolen")
    assert failed.value.code == Code.INVALID_ARGUMENT
    assert not (tmp_path / "stolen").exists()
    # '..' stays at the container's root; the host path under it is the container's
    escape = ext.FileLocation(
        container_id="box", path="/../../../../" + str(tmp_path / "payload-copy").lstrip("/")
    )
    with pytest.raises(TtrpcError):
        await upload(extensions, tmp_path / "payload", escape)
    assert not (tmp_path / "payload-copy").exists()
    escape = ext.FileLocation(container_id="box", path=f"/../../../{inside.name}/dotdot")
    await upload(extensions, tmp_path / "payload", escape)
    assert (inside / "dotdot").read_bytes() == b"payload\n"
    # an upload onto a symlink replaces the link, never writes through it
    await upload(extensions, tmp_path / "payload", at(inside, "file-link"))
    assert (outside / "secret").read_text() == "host secret\n"
    assert not (inside / "file-link").is_symlink()
    # /proc's magic links do not lead out
    proc_root = ext.FileLocation(container_id="box", path="/proc/1/root/etc/passwd")
    with pytest.raises(TtrpcError) as failed:
        await download(extensions, proc_root, tmp_path / "magic")
    assert failed.value.code == Code.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("location", "words"),
    [
        (ext.FileLocation(container_id="box", path="relative/x"), "must be absolute"),
        (ext.FileLocation(container_id="box", path="/"), "names no file"),
        (ext.FileLocation(container_id="box", path="/a/.."), "names no file"),
        (ext.FileLocation(container_id="box", path="/no/such/dir/x"), "No such file"),
        (ext.FileLocation(container_id="box", path="/bad\0name"), "NUL"),
        (ext.FileLocation(container_id="../x", path="/x"), "not a valid id"),
    ],
)
async def test_bad_locations_are_invalid_arguments(
    box: Any, tmp_path: Path, location: ext.FileLocation, words: str
) -> None:
    extensions, _inside = box
    (tmp_path / "p").write_bytes(b"p")
    with pytest.raises(TtrpcError) as failed:
        await upload(extensions, tmp_path / "p", location)
    assert failed.value.code == Code.INVALID_ARGUMENT and words in failed.value.message


async def test_download_of_a_directory_or_past_the_end(box: Any, tmp_path: Path) -> None:
    extensions, inside = box
    with pytest.raises(TtrpcError) as failed:
        await download(
            extensions, ext.FileLocation(container_id="box", path="/bin"), tmp_path / "d"
        )
    assert (
        failed.value.code == Code.INVALID_ARGUMENT and "not a regular file" in failed.value.message
    )
    (inside / "small").write_bytes(b"12")
    channel = await extensions.open("Download", ext.DownloadOutput)
    channel.send(ext.DownloadInput(open=ext.DownloadOpen(file=at(inside, "small"), offset=3)))
    with pytest.raises(TtrpcError) as failed:
        await channel.finish()
    assert failed.value.code == Code.INVALID_ARGUMENT and "past its end" in failed.value.message


async def test_transfers_at_once_are_bounded(box: Any, tmp_path: Path) -> None:
    extensions, inside = box
    caps = await extensions.capabilities()
    held = []
    for n in range(caps.limits.max_transfers):
        channel = await extensions.open("Upload", ext.UploadOutput)
        channel.send(ext.UploadInput(open=ext.UploadOpen(file=at(inside, f"h{n}"), size=10)))
        assert (await channel.recv()).ready  # type: ignore[union-attr]
        held.append(channel)
    (tmp_path / "one-more").write_bytes(b"x")
    with pytest.raises(TtrpcError) as failed:
        await upload(extensions, tmp_path / "one-more", at(inside, "one-more"))
    assert failed.value.code == Code.RESOURCE_EXHAUSTED and "limit" in failed.value.message
    for channel in held:
        channel.abort()
    await asyncio.sleep(0.1)
    await upload(extensions, tmp_path / "one-more", at(inside, "one-more"))


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _ctl_cp(address: str, src: str, dst: str) -> tuple[str, int]:
    """kata-agent-ctl cp; (stderr, its peak RSS in KiB). The peak is VmHWM, read
    while it runs: after exec it counts the tool alone (a child's ru_maxrss would
    count the test process it was forked from)."""
    proc = subprocess.Popen(
        [*CTL, "cp", "--progress", "always", address, src, dst],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    peak = 0
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.append(proc.stderr.read()))  # type: ignore[union-attr]
    reader.start()
    while proc.poll() is None:
        with contextlib.suppress(OSError, AssertionError):
            peak = max(peak, _peak_rss_kib(proc.pid))
        time.sleep(0.05)
    reader.join()
    assert proc.returncode == 0, stderr
    return "".join(stderr), peak


def _sha256_file(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 * MiB):
            digest.update(block)
    return digest.digest()


@pytest.mark.load
async def test_one_gib_each_way_with_bounded_memory(
    box: Any, tmp_path: Path, container_agent: AgentProcess
) -> None:
    _extensions, inside = box
    big = tmp_path / "big"
    block = os.urandom(8 * MiB)
    with big.open("wb") as f:
        for n in range(128):  # 1 GiB, every 8 MiB different
            f.write(n.to_bytes(8, "little") + block[8:])
    digest = _sha256_file(big)
    agent_pid = container_agent.proc.pid
    before = _peak_rss_kib(agent_pid)
    err, up_rss = await asyncio.to_thread(
        _ctl_cp, container_agent.address, str(big), f"box:/{inside.name}/big"
    )
    assert "100%" in err and "1.0 GiB/1.0 GiB" in err
    assert _sha256_file(inside / "big") == digest
    back = tmp_path / "big-back"
    _err, down_rss = await asyncio.to_thread(
        _ctl_cp, container_agent.address, f"box:/{inside.name}/big", str(back)
    )
    assert _sha256_file(back) == digest
    grown = _peak_rss_kib(agent_pid) - before
    # Bounded by the windows and chunks (a few MiB), not by the file (1 GiB).
    assert grown < 64 * 1024, f"the agent's peak RSS grew by {grown} KiB"
    assert up_rss < 160 * 1024 and down_rss < 160 * 1024, (up_rss, down_rss)


async def test_a_chunk_over_the_limit_is_refused(box: Any) -> None:
    extensions, inside = box
    caps = await extensions.capabilities()
    big = caps.limits.max_chunk_bytes + 1
    channel = await extensions.open("Upload", ext.UploadOutput)
    channel.send(ext.UploadInput(open=ext.UploadOpen(file=at(inside, "c"), size=big)))
    assert (await channel.recv()).ready  # type: ignore[union-attr]
    channel.send(ext.UploadInput(data=bytes(big)))
    with pytest.raises(TtrpcError) as failed:
        await channel.finish()
    assert failed.value.code == Code.INVALID_ARGUMENT and "is over" in failed.value.message


async def test_partial_uploads_of_a_killed_agent_are_removed_at_start(
    tmp_path: Path, rootfs: Path
) -> None:
    """An agent killed mid-upload leaves partial files; the next agent on the same
    run directory removes them before it serves - but only inside the container's
    root, even if the container has made the way there a symlink meanwhile."""
    from .conftest import run_container_agent

    kept = rootfs / f"kill-{os.getpid()}-{tmp_path.name}"
    moved = rootfs / f"kill-moved-{os.getpid()}-{tmp_path.name}"
    outside = tmp_path / "outside"
    kept.mkdir()
    moved.mkdir()
    random_file(tmp_path / "big", 64 * MiB)
    try:
        with run_container_agent(tmp_path) as agent:
            async with await Client.connect(agent.address) as client:
                await start_container(Stub(client, AGENT), rootfs, "kk", "/bin/sleep", "1000")
                extensions = Extensions(client)
                sent = asyncio.Event()

                def progress(done: int, total: int) -> None:
                    if done >= 8 * MiB:
                        sent.set()

                uploads = [
                    asyncio.ensure_future(
                        upload(
                            extensions,
                            tmp_path / "big",
                            ext.FileLocation(container_id="kk", path=f"/{d.name}/big"),
                            progress=progress,
                        )
                    )
                    for d in (kept, moved)
                ]
                await sent.wait()
                agent.proc.kill()
                agent.proc.wait()
                for done in await asyncio.gather(*uploads, return_exceptions=True):
                    assert isinstance(done, Exception)
        left = [p for d in (kept, moved) for p in d.iterdir()]
        assert len(left) == 2 and all(p.name.startswith(".pykata-partial-") for p in left)
        # The container makes the way to one of them lead out of its root.
        moved.rename(outside)
        moved.symlink_to(outside)
        (tmp_path / "agent.sock").unlink()  # the dead agent's
        with run_container_agent(tmp_path) as again:
            async with await Client.connect(again.address):
                pass  # serving: the leftovers are dealt with
        assert list(kept.iterdir()) == []
        assert [p.name for p in outside.iterdir()] == [left[1].name]
    finally:
        subprocess.run(["rm", "-rf", str(kept), str(moved)], check=False)
