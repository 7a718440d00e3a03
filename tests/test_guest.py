"""Guest-wide RPCs through a real agent: details, refusals on a host, entropy,
the memory agent, diagnostics and metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pykata import __version__
from pykata.api import agent_pb2
from pykata.ttrpc import Client, Code, Stub, TtrpcError

from .conftest import run_container_agent
from .containers import spec

AGENT = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]


async def test_guest_details_are_the_machines(api: Any) -> None:
    reply = await api.GetGuestDetails(
        agent_pb2.GuestDetailsRequest(mem_block_size=True, mem_hotplug_probe=True)
    )
    memory = Path("/sys/devices/system/memory")
    assert reply.mem_block_size_bytes == int((memory / "block_size_bytes").read_text(), 16)
    assert reply.support_mem_hotplug_probe == (memory / "probe").exists()
    details = reply.agent_details
    assert details.version == __version__ and not details.init_daemon
    assert set(details.storage_handlers) == {"local", "bind", "ephemeral", "overlayfs", "virtio-fs"}
    assert details.supports_seccomp  # crun and runc here are built with libseccomp
    # not asked for: not answered
    plain = await api.GetGuestDetails(agent_pb2.GuestDetailsRequest())
    assert plain.mem_block_size_bytes == 0


@pytest.mark.parametrize(
    ("method", "request_", "what"),
    [
        ("SetGuestDateTime", agent_pb2.SetGuestDateTimeRequest(Sec=0), "setting the clock"),
        ("OnlineCPUMem", agent_pb2.OnlineCPUMemRequest(nb_cpus=1), "onlining"),
        (
            "MemHotplugByProbe",
            agent_pb2.MemHotplugByProbeRequest(memHotplugProbeAddr=[0x100000000]),
            "probing",
        ),
        ("AddSwap", agent_pb2.AddSwapRequest(PCIPath=[2]), "adding swap"),
        ("AddSwapPath", agent_pb2.AddSwapPathRequest(path="/swapfile"), "adding swap"),
        ("MemAgentCompactSet", agent_pb2.MemAgentCompactConfig(disabled=False), "compaction"),
        ("MemAgentMemcgSet", agent_pb2.MemAgentMemcgConfig(disabled=False), "memcg"),
    ],
)
async def test_machine_changes_are_refused_on_a_host(
    api: Any, method: str, request_: Any, what: str
) -> None:
    before = time.time()
    with pytest.raises(TtrpcError) as exc:
        await getattr(api, method)(request_)
    assert exc.value.code == Code.INTERNAL
    assert what in exc.value.message and "would change the host" in exc.value.message
    assert abs(time.time() - before) < 60  # the clock was not set to 1970


async def test_owning_the_machine_acts_on_it(tmp_path: Path) -> None:
    """With agent.owns_machine the request reaches the kernel: every CPU here is
    already online, so asking to online one more says exactly that."""
    with run_container_agent(tmp_path, cmdline="agent.owns_machine") as agent:
        async with await Client.connect(agent.address) as client:
            api = Stub(client, AGENT)
            with pytest.raises(TtrpcError) as exc:
                await api.OnlineCPUMem(agent_pb2.OnlineCPUMemRequest(nb_cpus=1, cpu_only=True))
            assert exc.value.code == Code.INTERNAL
            assert "onlined 0 of 1 CPUs" in exc.value.message
            with pytest.raises(TtrpcError) as exc:
                await api.AddSwapPath(agent_pb2.AddSwapPathRequest(path=f"{tmp_path}/none"))
            assert exc.value.code == Code.INTERNAL
            with pytest.raises(TtrpcError) as exc:
                await api.MemAgentMemcgSet(agent_pb2.MemAgentMemcgConfig(disabled=False))
            assert "lru_gen" in exc.value.message  # this kernel has no MGLRU
            with pytest.raises(TtrpcError) as exc:
                await api.SetGuestDateTime(agent_pb2.SetGuestDateTimeRequest(Sec=1, Usec=10**6))
            assert exc.value.code == Code.INTERNAL


async def test_reseed_random(api: Any) -> None:
    await api.ReseedRandomDev(agent_pb2.ReseedRandomDevRequest(data=b"\x01" * 64))
    with pytest.raises(TtrpcError) as exc:
        await api.ReseedRandomDev(agent_pb2.ReseedRandomDevRequest())
    assert exc.value.code == Code.INTERNAL


async def test_memory_agent_settings_are_checked(api: Any) -> None:
    # disabling is always allowed, and the values are validated
    await api.MemAgentCompactSet(agent_pb2.MemAgentCompactConfig(disabled=True, period_secs=60))
    for bad in (
        agent_pb2.MemAgentCompactConfig(period_secs=0),
        agent_pb2.MemAgentCompactConfig(compact_psi_percent_limit=101),
        agent_pb2.MemAgentMemcgConfig(period_psi_percent_limit=200),
    ):
        method = api.MemAgentCompactSet if "Compact" in type(bad).__name__ else api.MemAgentMemcgSet
        with pytest.raises(TtrpcError) as exc:
            await method(bad)
        assert exc.value.code == Code.INTERNAL


async def test_diagnostic_data(api: Any, rootfs: Path) -> None:
    agent_log = await api.GetDiagnosticData(agent_pb2.GetDiagnosticDataRequest(log_type="agent"))
    assert any(json.loads(line)["msg"] == "agent serving" for line in agent_log.data.splitlines())
    mounts = await api.GetDiagnosticData(agent_pb2.GetDiagnosticDataRequest(log_type="mounts"))
    assert " / / " in mounts.data
    await api.CreateContainer(
        agent_pb2.CreateContainerRequest(container_id="d1", OCI=spec(rootfs, "sleep", "30"))
    )
    await api.StartContainer(agent_pb2.StartContainerRequest(container_id="d1"))
    report = await api.GetDiagnosticData(
        agent_pb2.GetDiagnosticDataRequest(log_type="container", container_id="d1")
    )
    data = json.loads(report.data)
    assert data["state"]["status"] == "running" and data["state"]["id"] == "d1"
    for bad, code in (
        (agent_pb2.GetDiagnosticDataRequest(log_type="nonsense"), Code.INVALID_ARGUMENT),
        (agent_pb2.GetDiagnosticDataRequest(log_type="container"), Code.INVALID_ARGUMENT),
        (
            agent_pb2.GetDiagnosticDataRequest(log_type="container", container_id="nope"),
            Code.INTERNAL,
        ),
    ):
        with pytest.raises(TtrpcError) as exc:
            await api.GetDiagnosticData(bad)
        assert exc.value.code == code
    await api.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id="d1"))


async def test_metrics_parse_as_prometheus_text(api: Any) -> None:
    first = (await api.GetMetrics(agent_pb2.GetMetricsRequest())).metrics
    second = (await api.GetMetrics(agent_pb2.GetMetricsRequest())).metrics
    families = {f.name: f for f in text_string_to_metric_families(second)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    mem_total_kb = int(Path("/proc/meminfo").read_text().split()[1])
    assert samples[("kata_guest_meminfo", (("item", "MemTotal"),))] == mem_total_kb * 1024
    assert samples[("kata_agent_process_resident_memory_bytes", ())] > 1 << 20
    assert ("kata_guest_load", (("item", "load1"),)) in samples
    assert ("kata_guest_cpu_time", (("cpu", "cpu0"), ("item", "user"))) in samples
    assert any(name == "kata_guest_netdev_stat" for name, _ in samples)
    assert any(name == "kata_guest_diskstat" for name, _ in samples)
    assert families["kata_agent_scrape"].type == "counter"
    assert samples[("kata_agent_scrape_total", ())] == 2
    assert "kata_agent_scrape_total 1.0" in first
