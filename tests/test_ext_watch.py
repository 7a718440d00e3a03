"""Watch: changes inside a real container, reported as they happen, bounded."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pykata.api import agent_pb2
from pykata.api import extensions_pb2 as ext
from pykata.extensions.client import Extensions
from pykata.extensions.streamexec import ExecSession
from pykata.extensions.watch import watch
from pykata.ttrpc import Client, Code, Stub, TtrpcError

from .conftest import AgentProcess
from .containers import process
from .extensions import start_container

AGENT = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
CTL = [sys.executable, "-m", "pykata.ctl.cli"]
Kind = ext.FileEvent.Kind


@pytest.fixture
async def box(
    container_agent: AgentProcess, rootfs: Path, tmp_path: Path
) -> AsyncIterator[tuple[Extensions, str]]:
    """A running container and a fresh directory in it (its path inside)."""
    name = f"w-{os.getpid()}-{tmp_path.name}"
    (rootfs / name).mkdir()
    async with await Client.connect(container_agent.address) as client:
        await start_container(Stub(client, AGENT), rootfs, "box", "/bin/sleep", "1000")
        try:
            yield Extensions(client), f"/{name}"
        finally:
            subprocess.run(["rm", "-rf", str(rootfs / name)], check=False)


async def sh(extensions: Extensions, script: str) -> None:
    session = await ExecSession.start(extensions, "box", process("/bin/sh", "-c", script))
    async for _ in session.output():
        pass
    assert session.exit_status == 0


async def until(
    events: AsyncIterator[tuple[list[ext.FileEvent], int]], count: int
) -> list[tuple[str, str, str]]:
    seen: list[tuple[str, str, str]] = []
    while len(seen) < count:
        batch, _lost = await asyncio.wait_for(events.__anext__(), 30)
        seen += [(Kind.Name(e.kind), e.path, e.old_path) for e in batch]
    return seen


async def test_create_modify_rename_delete(box: Any) -> None:
    extensions, d = box
    events = watch(extensions, ext.FileLocation(container_id="box", path=d))
    assert await events.__anext__() == ([], 0)  # in place
    await sh(extensions, f"echo a > {d}/f; mv {d}/f {d}/g; rm {d}/g; mkdir {d}/sub")
    seen = await until(events, 5)
    assert seen[:5] == [
        ("CREATE", f"{d}/f", ""),
        ("MODIFY", f"{d}/f", ""),
        ("RENAME", f"{d}/g", f"{d}/f"),
        ("DELETE", f"{d}/g", ""),
        ("CREATE", f"{d}/sub", ""),
    ]
    await events.aclose()


async def test_recursive_watch_follows_new_directories(box: Any) -> None:
    extensions, d = box
    await sh(extensions, f"mkdir -p {d}/old/deeper")
    events = watch(extensions, ext.FileLocation(container_id="box", path=d), recursive=True)
    await events.__anext__()
    await sh(extensions, f"touch {d}/old/deeper/x; mkdir {d}/new")
    seen = await until(events, 2)
    assert ("CREATE", f"{d}/old/deeper/x", "") in seen and ("CREATE", f"{d}/new", "") in seen
    await sh(extensions, f"touch {d}/new/y")
    seen = await until(events, 1)
    assert ("CREATE", f"{d}/new/y", "") in seen
    await events.aclose()


async def test_a_slow_client_is_told_what_it_lost(box: Any, container_agent: AgentProcess) -> None:
    extensions, d = box
    caps = await extensions.capabilities()
    events = watch(extensions, ext.FileLocation(container_id="box", path=d))
    await events.__anext__()
    total = caps.limits.watch_queue_events * 2
    # Many changes while we read nothing.
    await sh(extensions, f"cd {d}; i=0; while [ $i -lt {total} ]; do : > f$i; i=$((i+1)); done")
    received = lost = 0
    while received + lost < total:
        batch, dropped = await asyncio.wait_for(events.__anext__(), 30)
        received += len(batch)
        lost += dropped
    assert lost > 0
    # what was held is bounded: the queue, plus what was in flight
    assert received <= caps.limits.watch_queue_events + caps.limits.watch_window_events + 64 * 2
    await events.aclose()


async def test_watch_paths_stay_inside_and_are_checked(
    box: Any, rootfs: Path, tmp_path: Path
) -> None:
    extensions, d = box
    (rootfs / d.lstrip("/") / "out").symlink_to(tmp_path)
    for path, code in [
        (f"{d}/out", Code.INVALID_ARGUMENT),  # the host's tmp_path does not exist inside
        ("relative", Code.INVALID_ARGUMENT),
        (f"{d}/missing", Code.INVALID_ARGUMENT),
    ]:
        events = watch(extensions, ext.FileLocation(container_id="box", path=path))
        with pytest.raises(TtrpcError) as failed:
            await events.__anext__()
        assert failed.value.code == code, (path, failed.value)


async def test_watches_and_directories_are_bounded(box: Any) -> None:
    extensions, d = box
    caps = await extensions.capabilities()
    held = []
    for _ in range(caps.limits.max_watches):
        events = watch(extensions, ext.FileLocation(container_id="box", path=d))
        await events.__anext__()
        held.append(events)
    one_more = watch(extensions, ext.FileLocation(container_id="box", path=d))
    with pytest.raises(TtrpcError) as failed:
        await one_more.__anext__()
    assert failed.value.code == Code.RESOURCE_EXHAUSTED
    for events in held:
        await events.aclose()
    many = caps.limits.max_watched_directories + 10
    await sh(extensions, f"cd {d}; i=0; while [ $i -lt {many} ]; do mkdir d$i; i=$((i+1)); done")
    recursive = watch(extensions, ext.FileLocation(container_id="box", path=d), recursive=True)
    with pytest.raises(TtrpcError) as failed:
        await recursive.__anext__()
    assert failed.value.code == Code.RESOURCE_EXHAUSTED and "directories" in failed.value.message
    await asyncio.sleep(0.2)  # the earlier watches' ends have reached the agent
    ok = watch(extensions, ext.FileLocation(container_id="box", path=d))
    assert await ok.__anext__() == ([], 0)
    await ok.aclose()


async def test_ctl_watch_prints_changes(box: Any, container_agent: AgentProcess) -> None:
    extensions, d = box
    proc = await asyncio.create_subprocess_exec(
        *CTL, "watch", container_agent.address, f"box:{d}", stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        for _ in range(100):  # the watch is in place once an event shows up
            await sh(extensions, f"touch {d}/probe")
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), 0.5)
                break
            except TimeoutError:
                continue
        assert line.decode().startswith(("CREATE", "ATTRIB")), line
        await sh(extensions, f"mkdir {d}/dir; mv {d}/probe {d}/moved")
        lines = []
        while not any(b"RENAME" in x for x in lines):
            lines.append(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert f"CREATE {d}/dir/\n".encode() in lines
        assert f"RENAME {d}/probe -> {d}/moved\n".encode() in lines
    finally:
        proc.terminate()
        await proc.wait()
    assert proc.returncode == 0
