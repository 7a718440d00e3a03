"""A real guest: the agent as init of a QEMU VM (software emulation), driven from the host.

Slow (a boot is 10-20 s under TCG): one guest serves most tests, restored from a
snapshot (made once per image) rather than booted. It has two CPUs of which one
is offline (maxcpus=1), a debug console, tracing to a host forwarder and a blank
disk hotplugged after the restore, so each test can act through the agent and
look through the console. The tests at the end boot guests of their own. Nothing
here is mocked: the image is the one `make guest-image` builds.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pykata.api import agent_pb2
from pykata.extensions.client import Extensions
from pykata.extensions.streamexec import ExecSession
from pykata.ttrpc import Client, Stub
from pykata.vm import image as image_mod
from pykata.vm import qemu, snapshot

from .containers import build_rootfs, process
from .extensions import start_container
from .peers import processes_with
from .receivers import GrpcReceiver, forwarder
from .vmguest import guest_options

pytestmark = pytest.mark.vm
#: kata-agent-ctl's options for the guest of tests/vmguest.py (with --trace-socket).
SNAPSHOT_SHAPE = ["--cpus", "2", "--kernel-params", "maxcpus=1", "--debug-console"]
CTL = [sys.executable, "-m", "pykata.ctl.cli"]
AGENT = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]


@pytest.fixture(scope="module")
def receiver() -> Iterator[GrpcReceiver]:
    with GrpcReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def vm(
    guest_image: image_mod.GuestImage, guest_snapshot: snapshot.Snapshot, receiver: GrpcReceiver
) -> Iterator[qemu.Vm]:
    """Restored, not booted: these tests are about the agent in a guest, not the boot
    (tests/test_vm_snapshot.py shows a restored guest is a guest of its own)."""
    with tempfile.TemporaryDirectory(prefix="pykata-test-vm-") as tmp:
        trace_socket = f"{tmp}/trace.sock"
        blank_disk = Path(tmp) / "blank.img"  # for AddSwap
        with open(blank_disk, "wb") as disk:
            disk.truncate(16 << 20)
        with forwarder(f"unix://{trace_socket}", "--otlp-endpoint", receiver.endpoint):
            options = guest_options(
                guest_image, trace_socket=trace_socket, run_dir=Path(tmp) / "vm"
            )
            with snapshot.restored(options, guest_snapshot) as vm:
                hotplug_disk(vm, blank_disk)
                yield vm
                # The module's last test powers it off with DestroySandbox, as upstream.
                assert qemu.stop(vm) in ("powered off", "already stopped"), vm.console_tail()


def hotplug_disk(vm: qemu.Vm, path: Path) -> None:
    """A blank virtio-blk disk attached to the running guest (it becomes /dev/vdb)."""
    file = {"driver": "file", "filename": str(path)}
    qemu.qmp(vm, "blockdev-add", {"driver": "raw", "node-name": "blank", "file": file})
    qemu.qmp(vm, "device_add", {"driver": "virtio-blk-pci", "drive": "blank", "id": "blank"})


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A temporary directory with a short path: unix socket paths are limited to 107 bytes."""
    path = tempfile.mkdtemp(prefix="pykata-test-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def api(vm: qemu.Vm) -> AsyncIterator[Stub]:
    client = await Client.connect(vm.agent_address)
    try:
        yield Stub(client, AGENT)
    finally:
        await client.close()


def ctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CTL, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )


def in_guest(vm: qemu.Vm, command: str) -> str:
    """A command's output through the agent's debug console (the guest's own view)."""
    done = ctl("console", vm.console_address, "-c", command, "--timeout", "60")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_agent_is_init_and_mounted_what_an_init_mounts(vm: qemu.Vm) -> None:
    assert in_guest(vm, "cat /proc/1/comm") in ("python3", "kata-agent")
    mounts = in_guest(vm, "cat /proc/mounts")
    for point in ("/sys", "/dev", "/dev/pts", "/run", "/sys/fs/cgroup/memory"):
        assert f" {point} " in mounts, mounts
    # The agent loaded the serial channel's driver itself (the initramfs only has the disk's).
    assert "virtio_console" in in_guest(vm, "cat /proc/modules")


async def test_guest_details_are_the_guests(vm: qemu.Vm, api: Stub) -> None:
    details = await api.GetGuestDetails(
        agent_pb2.GuestDetailsRequest(mem_block_size=True, mem_hotplug_probe=True)
    )
    assert details.agent_details.init_daemon
    block = in_guest(vm, "cat /sys/devices/system/memory/block_size_bytes")
    assert details.mem_block_size_bytes == int(block, 16)
    probe = in_guest(vm, "test -e /sys/devices/system/memory/probe && echo yes || echo no")
    assert details.support_mem_hotplug_probe == (probe == "yes")


def test_container_lifecycle_through_ctl(vm: qemu.Vm) -> None:
    done = ctl(
        "connect", "--server-address", vm.agent_address,
        "--guest-rootfs", image_mod.GUEST_ROOTFS,
        "-c", "CreateSandbox hostname=vmbox 'dns=nameserver 192.0.2.53'",
        "-c", "run /bin/sh -c 'hostname; cat /etc/resolv.conf'",
        "-c", "run /bin/sh -c 'echo hello from $(uname -r); cat /proc/self/cgroup >&2; exit 3'",
    )  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr  # the last run's status
    release = in_guest(vm, "uname -r")
    assert f"hello from {release}" in done.stdout
    assert done.stderr.endswith("exit code 3\n")
    assert "vmbox\nnameserver 192.0.2.53" in done.stdout  # the sandbox's hostname and DNS
    # crun put the container in cgroups of the hierarchies the agent mounted.
    assert ":memory:/" in done.stderr


async def test_set_guest_date_time_sets_the_guest_clock(vm: qemu.Vm, api: Stub) -> None:
    target = int(time.time()) + 86400 * 365
    await api.SetGuestDateTime(agent_pb2.SetGuestDateTimeRequest(Sec=target, Usec=0))
    try:
        guest_now = int(in_guest(vm, "date +%s"))
        assert target <= guest_now < target + 60
    finally:
        now = time.time()
        await api.SetGuestDateTime(
            agent_pb2.SetGuestDateTimeRequest(Sec=int(now), Usec=int(now % 1 * 1e6))
        )
    assert abs(int(in_guest(vm, "date +%s")) - time.time()) < 60


async def test_add_swap_turns_the_disk_at_a_pci_path_into_swap(vm: qemu.Vm, api: Stub) -> None:
    # The disk was hotplugged after the restore: the guest finds it within moments.
    in_guest(vm, "for i in $(seq 100); do [ -e /sys/block/vdb ] && break; sleep 0.1; done")
    device = in_guest(vm, "readlink -f /sys/block/vdb/device")
    slot = re.search(r"/0000:00:([0-9a-f]{2})\.0/", device)
    assert slot, device
    await api.AddSwap(agent_pb2.AddSwapRequest(PCIPath=[int(slot.group(1), 16)]))
    assert "/dev/vdb" in in_guest(vm, "cat /proc/swaps")


async def test_add_swap_path_swaps_on_a_file(vm: qemu.Vm, api: Stub) -> None:
    in_guest(vm, "dd if=/dev/zero of=/var/swapfile bs=1M count=16 2>/dev/null")
    in_guest(vm, "chmod 600 /var/swapfile && mkswap /var/swapfile >/dev/null")
    await api.AddSwapPath(agent_pb2.AddSwapPathRequest(path="/var/swapfile"))
    assert "/var/swapfile" in in_guest(vm, "cat /proc/swaps")


async def test_online_cpu_mem_brings_the_offline_cpu_up(vm: qemu.Vm, api: Stub) -> None:
    assert in_guest(vm, "cat /sys/devices/system/cpu/online") == "0"
    await api.OnlineCPUMem(agent_pb2.OnlineCPUMemRequest(wait=True, nb_cpus=1))
    assert in_guest(vm, "cat /sys/devices/system/cpu/online") == "0-1"


async def test_spans_reach_the_host_forwarder(vm: qemu.Vm, receiver: GrpcReceiver) -> None:
    client = await Client.connect(vm.agent_address)
    try:
        await Stub(client, AGENT).ListInterfaces(agent_pb2.ListInterfacesRequest())
    finally:
        await client.close()
    deadline = time.monotonic() + 60
    names: set[str] = set()
    while not any("ListInterfaces" in name for name in names) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        names = {span.name for span in receiver.received.spans()}
    assert any("ListInterfaces" in name for name in names), names


async def test_streaming_exec_output_from_the_guest_is_whole_and_in_order(vm: qemu.Vm) -> None:
    # The guest kernel splices the output into the agent's connection (bridged
    # to its virtio-serial port, or vsock): every byte of both streams, in
    # order, and the exit status after them.
    size = 8 << 20
    script = f"yes out-line | head -c {size} & yes error-line | head -c {size} >&2; wait"
    async with await Client.connect(vm.agent_address) as client:
        api = Stub(client, AGENT)
        await start_container(api, Path(image_mod.GUEST_ROOTFS), "streams", "/bin/sleep", "600")
        session = await ExecSession.start(
            Extensions(client), "streams", process("/bin/sh", "-c", script)
        )
        out, err = bytearray(), bytearray()
        async for stream, data in session.output():
            (out if stream == "stdout" else err).extend(data)
        await api.RemoveContainer(
            agent_pb2.RemoveContainerRequest(container_id="streams", timeout=5)
        )
    assert session.exit_status == 0
    assert out == (b"out-line\n" * (size // 9 + 1))[:size]
    assert err == (b"error-line\n" * (size // 11 + 1))[:size]


async def test_clients_at_the_same_time_are_all_served(vm: qemu.Vm, api: Stub) -> None:
    # `api` holds a connection open; a kata-agent-ctl run meanwhile is a second client
    # on the same port (the relay in front of QEMU's one-client socket).
    await api.ListInterfaces(agent_pb2.ListInterfacesRequest())
    done = await asyncio.to_thread(
        ctl, "connect", "--server-address", vm.agent_address, "-c", "Check"
    )
    assert "SERVING" in done.stdout, done.stdout + done.stderr
    await api.ListInterfaces(agent_pb2.ListInterfacesRequest())


def test_a_second_client_right_after_the_first_is_served(vm: qemu.Vm) -> None:
    # Each ctl run is a new ttRPC client numbering its streams from 1 again.
    for _ in range(3):
        done = ctl("connect", "--server-address", vm.agent_address, "-c", "Check")
        assert done.returncode == 0 and "SERVING" in done.stdout, done.stdout + done.stderr


async def test_destroy_sandbox_powers_the_guest_off(vm: qemu.Vm, api: Stub) -> None:
    """Upstream's agent stops serving after DestroySandbox; as init, that is power-off.
    (The shared guest's last test: the tests after it boot guests of their own.)"""
    await api.CreateSandbox(agent_pb2.CreateSandboxRequest(hostname="last"))
    await api.DestroySandbox(agent_pb2.DestroySandboxRequest())  # answered first
    assert await asyncio.to_thread(vm.process.wait, 30) == 0
    assert "powering off" in vm.console_tail(), vm.console_tail()


def qemu_processes(marker: str) -> list[str]:
    return processes_with("qemu-system", marker)


def test_ctl_vm_option_boots_shares_the_bundle_runs_and_stops(
    guest_image: image_mod.GuestImage, tmp_path: Path, short_tmp: str
) -> None:
    rootfs = build_rootfs(tmp_path / "bundle" / "rootfs")
    (rootfs / "marker").write_text("from the host\n")
    env = {**os.environ, "TMPDIR": short_tmp}
    done = subprocess.run(
        [*CTL, "connect", "--vm", "qemu", "--bundle-dir", str(tmp_path / "bundle"),
         "-c", "Check", "-c", "run /bin/cat /marker",
         "-c", "run /bin/sh -c 'echo from the guest > /written; exit 7'"],
        capture_output=True, text=True, timeout=240, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 7, done.stdout + done.stderr  # the container's, with --vm too
    # The bundle reached the guest over virtio-fs, both ways.
    assert "from the host" in done.stdout and "exit code 0" in done.stderr
    assert (rootfs / "written").read_text() == "from the guest\n"
    accel_lines = [line for line in done.stderr.splitlines() if " accel " in line]
    assert len(accel_lines) == 1, done.stderr
    assert "guest stopped: powered off" in done.stderr
    assert qemu_processes(env["TMPDIR"]) == []
    assert processes_with("virtiofsd", env["TMPDIR"]) == []


def test_killed_ctl_leaves_no_qemu(guest_image: image_mod.GuestImage, short_tmp: str) -> None:
    proc = subprocess.Popen(
        [*CTL, "vm", "--accel", "tcg", "--run-dir", f"{short_tmp}/vm"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not qemu_processes(short_tmp) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_processes(short_tmp), "QEMU never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while qemu_processes(short_tmp) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_processes(short_tmp) == []


def test_vm_command_prints_how_to_reach_the_guest_and_stops_on_sigterm(
    guest_snapshot: snapshot.Snapshot, short_tmp: str, tmp_path: Path
) -> None:
    """Restored (`vm --from-snapshot`): this is about the vm command, not the boot."""
    rootfs = build_rootfs(tmp_path / "bundle" / "rootfs")
    (rootfs / "marker").write_text("shared by vm\n")
    proc = subprocess.Popen(
        [*CTL, "vm", "--accel", "tcg", "--run-dir", f"{short_tmp}/vm",
         "--bundle-dir", str(tmp_path / "bundle"), "--from-snapshot", str(guest_snapshot.directory),
         *SNAPSHOT_SHAPE, "--trace-socket", f"{short_tmp}/trace.sock"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("agent:"), first + (proc.stderr.read() if proc.stderr else "")
        # The line it prints is a working command, as a user would paste it.
        printed = shlex.split(proc.stdout.readline())
        assert printed[:2] == ["kata-agent-ctl", "connect"], printed
        done = ctl(*printed[1:])
        assert "Linux" in done.stdout and "exit code 0" in done.stderr, done.stdout + done.stderr
        done = ctl(*printed[1:-2], "-c", "run /bin/cat /marker")
        assert "shared by vm" in done.stdout, done.stdout + done.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "guest stopped: powered off" in err
    assert qemu_processes(short_tmp) == []
    assert processes_with("virtiofsd", short_tmp) == []


def test_manifest_says_what_the_image_holds(guest_image: image_mod.GuestImage) -> None:
    manifest = guest_image.manifest
    assert manifest["kernel_release"] and manifest["container_rootfs"] == image_mod.GUEST_ROOTFS
    assert any(str(r).startswith("protobuf==") for r in manifest["python_requirements"])
    assert json.loads((guest_image.directory / "manifest.json").read_text()) == manifest


def test_a_guest_whose_agent_cannot_start_is_reported_with_its_console(
    guest_image: image_mod.GuestImage, short_tmp: str
) -> None:
    done = subprocess.run(
        [*CTL, "connect", "--vm", "qemu", "--accel", "tcg", "--kernel-params", "agent.log=loud",
         "-c", "Check"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "TMPDIR": short_tmp},
    )  # fmt: skip
    assert done.returncode == 1
    # The agent refused its option and, as init, powered off; the user sees why.
    assert "QEMU exited (0) before the agent answered" in done.stderr
    assert "agent.log: invalid log level 'loud'" in done.stderr
    assert qemu_processes(short_tmp) == []
