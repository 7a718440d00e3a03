"""CopyFile through a real agent: only below <run_dir>/shared/containers, atomic, chunked.

Failures answer INTERNAL, as upstream's agent answers every CopyFile failure
(docs/api.md); the messages say what was wrong.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from pykata.api import agent_pb2, health_pb2
from pykata.ttrpc import Code, TtrpcError

AGENT = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]


def copy(path: Path | str, data: bytes, **fields: Any) -> agent_pb2.CopyFileRequest:
    fields.setdefault("file_size", len(data))
    fields.setdefault("file_mode", stat.S_IFREG | 0o640)
    fields.setdefault("dir_mode", 0o750)
    return agent_pb2.CopyFileRequest(path=str(path), data=data, **fields)


async def still_serving(api: Any) -> None:
    reply = await api._client.call(
        "grpc.Health", "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_copies_a_file_creating_parents(api: Any, tmp_path: Path) -> None:
    target = tmp_path / "run/shared/containers/c1/etc/hosts"
    await api.CopyFile(copy(target, b"127.0.0.1 localhost\n", uid=65534, gid=65534))
    assert target.read_bytes() == b"127.0.0.1 localhost\n"
    st = target.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == (65534, 65534)
    parent = target.parent.stat()
    assert stat.S_IMODE(parent.st_mode) == 0o750 and parent.st_uid == 65534
    # no partial file left behind
    assert os.listdir(target.parent) == ["hosts"]
    # the requested modes exactly, whatever the agent's umask
    wide = tmp_path / "run/shared/containers/c2/tmp/f"
    await api.CopyFile(copy(wide, b"x", dir_mode=0o777, file_mode=stat.S_IFREG | 0o666))
    assert stat.S_IMODE(wide.parent.stat().st_mode) == 0o777
    assert stat.S_IMODE(wide.stat().st_mode) == 0o666


async def test_chunks_appear_only_when_complete(api: Any, tmp_path: Path) -> None:
    target = tmp_path / "run/shared/containers/big.bin"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"old content")
    data = os.urandom(3 * (1 << 20) + 123)
    chunk = 1 << 20
    for offset in range(0, len(data), chunk):
        await api.CopyFile(
            copy(target, data[offset : offset + chunk], file_size=len(data), offset=offset)
        )
        if offset + chunk < len(data):
            # the target is the old file until the last byte is in
            assert target.read_bytes() == b"old content"
    assert target.read_bytes() == data


async def test_chunk_out_of_order_is_refused(api: Any, tmp_path: Path) -> None:
    target = tmp_path / "run/shared/containers/f"
    await api.CopyFile(copy(target, b"abc", file_size=9, offset=0))
    with pytest.raises(TtrpcError) as exc:
        await api.CopyFile(copy(target, b"ghi", file_size=9, offset=6))
    assert exc.value.code == Code.INTERNAL and "offset 6" in exc.value.message
    with pytest.raises(TtrpcError) as exc:
        await api.CopyFile(copy(target, b"defghijkl", file_size=9, offset=3))
    assert exc.value.code == Code.INTERNAL and "past file_size" in exc.value.message
    assert not target.exists()


@pytest.mark.parametrize(
    "path",
    [
        "{run}/shared/containers/../../containers/evil",
        "{run}/shared/containers/./x",
        "/etc/pykata-evil",
        "{run}/shared/containers",
        "{run}/shared/x",
        "{run}/shared/containersx/evil",
        "relative/evil",
    ],
)
async def test_escapes_are_refused(api: Any, tmp_path: Path, path: str) -> None:
    run = tmp_path / "run"
    with pytest.raises(TtrpcError) as exc:
        await api.CopyFile(copy(path.format(run=run), b"evil"))
    assert exc.value.code == Code.INTERNAL
    assert path.format(run=run) in exc.value.message
    assert not Path("/etc/pykata-evil").exists()
    assert not (run / "containers/evil").exists()
    await still_serving(api)


async def test_symlinks_leading_out_are_not_followed(api: Any, tmp_path: Path) -> None:
    shared = tmp_path / "run/shared/containers"
    outside = tmp_path / "outside"
    outside.mkdir()
    await api.CopyFile(copy(shared / "dir", b"", file_mode=stat.S_IFDIR | 0o755))
    (shared / "dir/link").symlink_to(outside)
    with pytest.raises(TtrpcError) as exc:
        await api.CopyFile(copy(shared / "dir/link/evil", b"evil"))
    assert exc.value.code == Code.INTERNAL and "symlinks are not followed" in str(exc.value)
    assert list(outside.iterdir()) == []
    # a symlink as the target itself is replaced, never written through
    (shared / "dir/file").symlink_to(outside / "victim")
    await api.CopyFile(copy(shared / "dir/file", b"safe"))
    assert not (outside / "victim").exists()
    assert (shared / "dir/file").read_bytes() == b"safe" and not (shared / "dir/file").is_symlink()
    await still_serving(api)


async def test_directories_and_symlinks(api: Any, tmp_path: Path) -> None:
    shared = tmp_path / "run/shared/containers"
    await api.CopyFile(copy(shared / "d/e", b"", file_mode=stat.S_IFDIR | 0o711))
    assert (shared / "d/e").is_dir() and stat.S_IMODE((shared / "d/e").stat().st_mode) == 0o711
    await api.CopyFile(copy(shared / "d/l", b"e", file_mode=stat.S_IFLNK | 0o777))
    assert os.readlink(shared / "d/l") == "e"
    with pytest.raises(TtrpcError) as exc:
        await api.CopyFile(copy(shared / "d/fifo", b"", file_mode=stat.S_IFIFO | 0o600))
    assert exc.value.code == Code.INTERNAL
