"""Volume RPCs through a real agent: stats, ephemeral resize, online ext4 growth."""

from __future__ import annotations

import contextlib
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pykata.api import agent_pb2, csi_pb2
from pykata.ttrpc import Client, Code, Stub, TtrpcError

from .conftest import run_container_agent

AGENT = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
MiB = 1 << 20


def ephemeral(point: Path, size: str) -> agent_pb2.Storage:
    return agent_pb2.Storage(
        driver="ephemeral", source="tmpfs", options=[f"size={size}"], mount_point=str(point)
    )


async def byte_usage(api: Any, path: Path) -> csi_pb2.VolumeUsage:
    stats = await api.GetVolumeStats(agent_pb2.VolumeStatsRequest(volume_guest_path=str(path)))
    by_unit = {u.unit: u for u in stats.usage}
    assert set(by_unit) == {csi_pb2.VolumeUsage.BYTES, csi_pb2.VolumeUsage.INODES}
    return by_unit[csi_pb2.VolumeUsage.BYTES]


async def test_stats_and_ephemeral_update(tmp_path: Path) -> None:
    point = tmp_path / "run/sandbox/scratch"
    with run_container_agent(tmp_path) as agent:
        async with await Client.connect(agent.address) as client:
            api = Stub(client, AGENT)
            storage = ephemeral(point, "4m")
            storage.options.append("mode=0750")
            await api.CreateSandbox(agent_pb2.CreateSandboxRequest(storages=[storage]))
            # seen in the agent's own mount namespace: the tmpfs with its mode
            in_agent = Path(f"/proc/{agent.proc.pid}/root{point}")
            assert stat.S_IMODE(in_agent.stat().st_mode) == 0o750
            usage = await byte_usage(api, point)
            assert usage.total == 4 * MiB and usage.used < usage.total
            await api.UpdateEphemeralMounts(
                agent_pb2.UpdateEphemeralMountsRequest(storages=[ephemeral(point, "8m")])
            )
            assert (await byte_usage(api, point)).total == 8 * MiB
            for bad, code in (
                (ephemeral(tmp_path / "run/elsewhere", "8m"), Code.INTERNAL),
                (agent_pb2.Storage(driver="local", mount_point=str(point)), Code.INTERNAL),
                (ephemeral(Path("/tmp"), "1m"), Code.INTERNAL),
            ):
                with pytest.raises(TtrpcError) as exc:
                    await api.UpdateEphemeralMounts(
                        agent_pb2.UpdateEphemeralMountsRequest(storages=[bad])
                    )
                assert exc.value.code == code, exc.value
            for path, code in (
                (tmp_path / "run/nothing", Code.INTERNAL),
                (Path("/etc"), Code.INTERNAL),
            ):
                with pytest.raises(TtrpcError) as exc:
                    await byte_usage(api, path)
                assert exc.value.code == code
            with pytest.raises(TtrpcError) as exc:  # tmpfs does not grow online
                await api.ResizeVolume(agent_pb2.ResizeVolumeRequest(volume_guest_path=str(point)))
            assert exc.value.code == Code.INTERNAL and "tmpfs" in exc.value.message
            # nothing stale here: the live mount stays
            await api.RemoveStaleVirtiofsShareMounts(
                agent_pb2.RemoveStaleVirtiofsShareMountsRequest()
            )
            assert (await byte_usage(api, point)).total == 8 * MiB


@contextlib.contextmanager
def xfs_on_loop(image: Path, point: Path, size: int) -> Iterator[str]:
    """An XFS filesystem on a loop device, mounted at `point` (before the agent starts,
    so its private mount namespace has it). XFS, not ext4: growing ext4 online needs
    CAP_SYS_RESOURCE, which these machines withhold even from root."""
    subprocess.run(["truncate", "-s", str(size), str(image)], check=True)
    subprocess.run(["mkfs.xfs", "-q", str(image)], check=True)
    device = subprocess.run(
        ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    point.mkdir(parents=True)
    try:
        subprocess.run(["mount", device, str(point)], check=True)
        try:
            yield device
        finally:
            subprocess.run(["umount", "--lazy", str(point)], check=False)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


async def test_resize_grows_xfs_online(tmp_path: Path) -> None:
    image, point = tmp_path / "vol.img", tmp_path / "run/vol"
    with xfs_on_loop(image, point, 300 * MiB) as device, run_container_agent(tmp_path) as agent:
        async with await Client.connect(agent.address) as client:
            api = Stub(client, AGENT)
            before = (await byte_usage(api, point)).total
            # the host grows the disk; the guest's filesystem follows on ResizeVolume
            subprocess.run(["truncate", "-s", str(600 * MiB), str(image)], check=True)
            subprocess.run(["losetup", "-c", device], check=True)
            await api.ResizeVolume(agent_pb2.ResizeVolumeRequest(volume_guest_path=str(point)))
            after = (await byte_usage(api, point)).total
    assert before < 300 * MiB < after <= 600 * MiB
