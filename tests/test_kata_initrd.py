"""The Kata initrd, booted the way Kata's Go runtime boots an `initrd =` guest and
driven the way the runtime drives the agent (software emulation: slow).

As Kata does it (kata-containers src/runtime/virtcontainers/qemu*.go, kata_agent.go):
the QEMU machine (q35, no disk, kernel and initrd, the console on a virtio-serial
hvc0, virtio-scsi, virtio-rng, a PCI bridge), Kata's kernel command line, the
virtio-fs share tagged kataShared with guest memory in a /dev/shm file, a virtio-net
NIC (on a QEMU hub with no other port: no packet leaves), and the runtime's calls
in its order: Check, UpdateInterface, UpdateRoutes, CreateSandbox with the shared
directory's storage, CreateContainer with a spec as the runtime sends it (rootfs
and hostname file on the share), StartContainer, output, WaitProcess,
RemoveContainer, DestroySandbox.

Not as Kata does it: the channel. Kata reaches the agent over vsock (a
vhost-vsock-pci device, port 1024); these hosts have no /dev/vhost-vsock, so the
agent serves on a virtio-serial port instead (agent.server_addr=serial://..., one
more kernel parameter, as a user would add to kernel_params). That the guest's
vsock driver loads is checked; a vsock connection is not.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pykata.api import agent_pb2, health_pb2, oci_pb2, types_pb2
from pykata.ttrpc import Client, Stub
from pykata.vm import GUEST_SHARE, SHARE_TAG, qemu
from pykata.vm import image as image_mod

from .containers import as_the_kata_runtime_sends, build_rootfs, spec

pytestmark = pytest.mark.vm
CTL = [sys.executable, "-m", "pykata.ctl.cli"]
AGENT = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
MAC = "52:54:00:4b:41:54"
SANDBOX = "0123456789abcdef"
CID = "fedcba9876543210"
#: The host side of the share: the runtime's <sandbox>/shared directory.
HOSTNAME_FILE = f"{CID}-5f1a2b3c4d5e6f70-hostname"


@pytest.fixture(scope="module")
def shared() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="pykata-test-kata-") as tmp:
        share = Path(tmp) / "shared"
        rootfs = build_rootfs(share / CID / "rootfs")
        (rootfs / "marker").write_text("from the host\n")
        (share / HOSTNAME_FILE).write_text("kata-pod\n")
        yield share


@pytest.fixture(scope="module")
def vm(shared: Path) -> Iterator[qemu.Vm]:
    guest = image_mod.build(quiet=True, kata_initrd=True)
    with tempfile.TemporaryDirectory(prefix="pykata-test-kvm-") as tmp:
        options = qemu.VmOptions(
            image=guest,
            layout="kata-initrd",
            accel="tcg",
            channel="serial",
            memory_mib=2048,  # Kata's default_memory: the root file system is in memory
            cpus=1,
            debug_console=True,
            shared_dir=shared,
            run_dir=Path(tmp) / "vm",
            extra_args=[
                "-netdev", "hubport,id=net0,hubid=0",
                "-device", f"virtio-net-pci,netdev=net0,mac={MAC}",
            ],
        )  # fmt: skip
        with qemu.launched(options) as vm:
            yield vm
            # The last test destroys the sandbox: the agent powers the guest off.
            assert qemu.stop(vm) in ("powered off", "already stopped"), vm.console_tail()


@pytest.fixture
async def client(vm: qemu.Vm) -> AsyncIterator[Client]:
    client = await Client.connect(vm.agent_address)
    try:
        yield client
    finally:
        await client.close()


def in_guest(vm: qemu.Vm, command: str) -> str:
    done = subprocess.run(
        [*CTL, "console", vm.console_address, "-c", command, "--timeout", "60"],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_initrd_is_the_root_and_the_agent_its_init(vm: qemu.Vm) -> None:
    # The kernel found no root= (as Kata boots an initrd) and kept the initrd as /.
    assert in_guest(vm, "head -n1 /proc/mounts").startswith("rootfs / rootfs ")
    cmdline = in_guest(vm, "cat /proc/cmdline")
    assert "console=hvc0" in cmdline and "root=" not in cmdline
    assert "kata-agent" in in_guest(vm, "tr '\\0' ' ' < /proc/1/cmdline")
    assert in_guest(vm, "ls /sys/block | grep -c '^vd' || true") == "0"  # no disk at all
    # The agent's log reached the console Kata reads (hvc0, a virtio-serial port).
    assert '"agent serving"' in vm.console_log.read_text()
    # /init loaded the drivers of Kata's devices, vsock's among them.
    modules = in_guest(vm, "cut -d' ' -f1 /proc/modules").split()
    for driver in ("virtio_pci", "virtio_net", "virtiofs", "vmw_vsock_virtio_transport"):
        assert driver in modules, modules
    assert in_guest(vm, "test -c /dev/vsock && echo yes") == "yes"


async def test_a_pod_as_the_kata_runtime_runs_it(vm: qemu.Vm, client: Client, shared: Path) -> None:
    health = Stub(client, HEALTH)
    assert (await health.Check(health_pb2.CheckRequest())).status == 1  # SERVING
    api = Stub(client, AGENT)
    interface = await api.UpdateInterface(
        agent_pb2.UpdateInterfaceRequest(
            interface=types_pb2.Interface(
                name="eth0",
                hwAddr=MAC,
                mtu=1500,
                IPAddresses=[types_pb2.IPAddress(address="192.0.2.10", mask="24")],
            )
        )
    )
    assert interface.name == "eth0"  # the NIC QEMU gave, found by its MAC
    await api.UpdateRoutes(
        agent_pb2.UpdateRoutesRequest(
            routes=agent_pb2.Routes(
                Routes=[types_pb2.Route(dest="default", gateway="192.0.2.1", device="eth0")]
            )
        )
    )
    # kata_agent.go setupStorages: the share, with the runtime's trailing slash.
    share = agent_pb2.Storage(
        driver="virtio-fs", source=SHARE_TAG, fstype="virtiofs", mount_point=f"{GUEST_SHARE}/"
    )
    await api.CreateSandbox(
        agent_pb2.CreateSandboxRequest(hostname="kata-pod", storages=[share], sandbox_id=SANDBOX)
    )
    script = "cat /etc/hostname /marker; ip -o -4 addr show eth0; echo written > /out; exit 3"
    message = as_the_kata_runtime_sends(
        spec(Path(f"{GUEST_SHARE}/{CID}/rootfs"), "/bin/sh", "-c", script)
    )
    message.Mounts.append(
        oci_pb2.Mount(
            destination="/etc/hostname",
            source=f"{GUEST_SHARE}/{HOSTNAME_FILE}",
            type="bind",
            options=["rbind", "rprivate", "ro"],
        )
    )
    await api.CreateContainer(
        agent_pb2.CreateContainerRequest(
            container_id=CID, exec_id=CID, OCI=message, sandbox_pidns=False
        )
    )
    await api.StartContainer(agent_pb2.StartContainerRequest(container_id=CID))
    output, status = await asyncio.gather(
        read_all(api, CID), api.WaitProcess(agent_pb2.WaitProcessRequest(container_id=CID))
    )
    text = output.decode()
    assert text.startswith("kata-pod\nfrom the host\n"), text
    assert "inet 192.0.2.10/24" in text  # the sandbox's network is the guest's own
    assert status.status == 3
    assert (shared / CID / "rootfs" / "out").read_text() == "written\n"  # back on the host
    await api.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id=CID))


async def test_destroy_sandbox_powers_the_guest_off(vm: qemu.Vm, client: Client) -> None:
    await Stub(client, AGENT).DestroySandbox(agent_pb2.DestroySandboxRequest())
    assert await asyncio.to_thread(vm.process.wait, 60) == 0
    assert "powering off" in vm.console_tail(), vm.console_tail()


async def read_all(api: Stub, cid: str) -> bytes:
    chunks = []
    while True:
        reply = await api.ReadStdout(
            agent_pb2.ReadStreamRequest(container_id=cid, exec_id=cid, len=65536)
        )
        if not reply.data:  # the end of the stream
            return b"".join(chunks)
        chunks.append(reply.data)
