"""Networking RPCs through a real agent, in the sandbox's own network namespace.

The test plugs one end of a real veth pair into the sandbox, configures it
through the agent, checks the result with `ip` as a user would, and has a
container in the sandbox fetch a page from the host end.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pykata.api import agent_pb2, types_pb2
from pykata.ttrpc import Code, TtrpcError

from .conftest import AgentProcess
from .containers import spec
from .test_containers import read_all

AGENT = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
HOST_IP, SANDBOX_IP = "10.123.0.1", "10.123.0.2"


def sandbox_holder(agent: AgentProcess) -> int:
    """The pid of the process holding the sandbox's namespaces: the agent's child
    in another network namespace (its command line may still be the shell's)."""
    pid = agent.proc.pid
    own = os.readlink(f"/proc/{pid}/ns/net")
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        if os.readlink(f"/proc/{child}/ns/net") != own:
            return int(child)
    raise AssertionError("no sandbox holder process")


def in_sandbox(pid: int, *command: str) -> str:
    return subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", "--", *command],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


@contextlib.contextmanager
def veth_into(pid: int) -> Iterator[str]:
    """A veth pair: the host end has HOST_IP, the other end goes into the sandbox."""
    host, guest = f"vh{os.getpid() % 10000}", f"vg{os.getpid() % 10000}"
    subprocess.run(["ip", "link", "add", host, "type", "veth", "peer", "name", guest], check=True)
    try:
        subprocess.run(["ip", "link", "set", guest, "netns", str(pid)], check=True)
        subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", host], check=True)
        subprocess.run(["ip", "link", "set", host, "up"], check=True)
        yield guest
    finally:
        subprocess.run(["ip", "link", "del", host], check=False)


@contextlib.contextmanager
def web_server(address: str) -> Iterator[int]:
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hello from the host end\n")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer((address, 0), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


async def test_network_needs_a_sandbox_on_a_host(api: Any) -> None:
    with pytest.raises(TtrpcError) as exc:
        await api.ListInterfaces(agent_pb2.ListInterfacesRequest())
    assert exc.value.code == Code.INTERNAL and "CreateSandbox" in exc.value.message


async def test_configure_the_sandbox_network(
    api: Any, container_agent: AgentProcess, rootfs: Path
) -> None:
    await api.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id=f"net-{os.getpid()}"))
    holder = sandbox_holder(container_agent)
    host_rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    with veth_into(holder) as guest_end:
        listed = await api.ListInterfaces(agent_pb2.ListInterfacesRequest())
        by_name = {i.name: i for i in listed.Interfaces}
        assert set(by_name) == {"lo", guest_end}  # the sandbox's own namespace, not the host's
        hw_addr = by_name[guest_end].hwAddr

        updated = await api.UpdateInterface(
            agent_pb2.UpdateInterfaceRequest(
                interface=types_pb2.Interface(
                    name="eth0",
                    hwAddr=hw_addr,
                    mtu=1400,
                    IPAddresses=[types_pb2.IPAddress(address=SANDBOX_IP, mask="24")],
                )
            )
        )
        assert updated.name == "eth0" and updated.mtu == 1400
        assert [(a.address, a.mask) for a in updated.IPAddresses if a.family == types_pb2.v4] == [
            (SANDBOX_IP, "24")
        ]
        link = json.loads(in_sandbox(holder, "ip", "-j", "addr", "show", "eth0"))[0]
        assert link["mtu"] == 1400 and "UP" in link["flags"]
        assert {a["local"] for a in link["addr_info"] if a["family"] == "inet"} == {SANDBOX_IP}

        routes = await api.UpdateRoutes(
            agent_pb2.UpdateRoutesRequest(
                routes=agent_pb2.Routes(
                    Routes=[
                        types_pb2.Route(gateway=HOST_IP, device="eth0"),
                        types_pb2.Route(dest="10.123.0.0/24", device="eth0", source=SANDBOX_IP),
                    ]
                )
            )
        )
        assert any(r.gateway == HOST_IP and r.dest == "" for r in routes.Routes)
        assert f"default via {HOST_IP} dev eth0" in in_sandbox(holder, "ip", "route")
        listed_routes = await api.ListRoutes(agent_pb2.ListRoutesRequest())
        assert {(r.dest, r.device) for r in listed_routes.Routes} >= {
            ("", "eth0"),
            ("10.123.0.0/24", "eth0"),
        }

        await api.AddARPNeighbors(
            agent_pb2.AddARPNeighborsRequest(
                neighbors=agent_pb2.ARPNeighbors(
                    ARPNeighbors=[
                        types_pb2.ARPNeighbor(
                            toIPAddress=types_pb2.IPAddress(address="10.123.0.9"),
                            device="eth0",
                            lladdr="02:00:00:00:00:09",
                            state=0x80,  # NUD_PERMANENT
                        )
                    ]
                )
            )
        )
        neighbours = in_sandbox(holder, "ip", "neigh", "show", "dev", "eth0")
        assert "10.123.0.9 lladdr 02:00:00:00:00:09 PERMANENT" in neighbours

        for ipv6, drop in ((False, "--dport 9"), (True, "--dport 19")):
            rules = f"*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp -m tcp {drop} -j DROP\nCOMMIT\n"
            await api.SetIPTables(agent_pb2.SetIPTablesRequest(is_ipv6=ipv6, data=rules.encode()))
            got = await api.GetIPTables(agent_pb2.GetIPTablesRequest(is_ipv6=ipv6))
            assert f"-A INPUT -p tcp -m tcp {drop} -j DROP" in got.data.decode()
        host_after = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
        assert "--dport 9 " not in host_after and host_after.count("\n") == host_rules.count("\n")

        # a container of the sandbox reaches the host end through it
        with web_server(HOST_IP) as port:
            await api.CreateContainer(
                agent_pb2.CreateContainerRequest(
                    container_id="web",
                    OCI=spec(rootfs, "wget", "-q", "-O", "-", f"http://{HOST_IP}:{port}/"),
                )
            )
            await api.StartContainer(agent_pb2.StartContainerRequest(container_id="web"))
            output = await read_all(api, "web")
            status = await api.WaitProcess(agent_pb2.WaitProcessRequest(container_id="web"))
        assert (status.status, output) == (0, b"hello from the host end\n")
        await api.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id="web"))


async def test_bad_network_requests(api: Any, container_agent: AgentProcess) -> None:
    await api.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id=f"bad-{os.getpid()}"))
    # Network failures answer INTERNAL, as upstream; a missing field INVALID_ARGUMENT.
    cases = [
        ("UpdateInterface", agent_pb2.UpdateInterfaceRequest(), Code.INVALID_ARGUMENT, "interface"),
        ("UpdateRoutes", agent_pb2.UpdateRoutesRequest(), Code.INVALID_ARGUMENT, "routes"),
        ("AddARPNeighbors", agent_pb2.AddARPNeighborsRequest(), Code.INVALID_ARGUMENT, "neighbors"),
        (
            "UpdateInterface",
            agent_pb2.UpdateInterfaceRequest(
                interface=types_pb2.Interface(name="eth9", hwAddr="02:00:00:00:99:99")
            ),
            Code.INTERNAL,
            "02:00:00:00:99:99",
        ),
        (
            "UpdateInterface",
            agent_pb2.UpdateInterfaceRequest(
                interface=types_pb2.Interface(
                    name="lo", IPAddresses=[types_pb2.IPAddress(address="10.0.0.300", mask="24")]
                )
            ),
            Code.INTERNAL,
            "10.0.0.300",
        ),
        (
            "UpdateRoutes",
            agent_pb2.UpdateRoutesRequest(
                routes=agent_pb2.Routes(Routes=[types_pb2.Route(dest="10.0.0/33", device="lo")])
            ),
            Code.INTERNAL,
            "10.0.0/33",
        ),
        (
            "UpdateRoutes",
            agent_pb2.UpdateRoutesRequest(
                routes=agent_pb2.Routes(Routes=[types_pb2.Route(dest="10.9.0.0/16", device="nic7")])
            ),
            Code.INTERNAL,
            "nic7",
        ),
        (
            "UpdateRoutes",
            agent_pb2.UpdateRoutesRequest(
                routes=agent_pb2.Routes(Routes=[types_pb2.Route(dest="10.9.0.0/16")])
            ),
            Code.INTERNAL,
            "neither a device nor a gateway",
        ),
        (
            "SetIPTables",
            agent_pb2.SetIPTablesRequest(data=b"*filter\n-A NOWHERE -j DROP\nCOMMIT\n"),
            Code.INTERNAL,
            "iptables-restore",
        ),
    ]
    for method, request, code, named in cases:
        with pytest.raises(TtrpcError) as exc:
            await getattr(api, method)(request)
        assert exc.value.code == code, (method, exc.value)
        assert named in exc.value.message
    # still serving, and nothing changed
    listed = await api.ListInterfaces(agent_pb2.ListInterfacesRequest())
    assert [i.name for i in listed.Interfaces] == ["lo"]
