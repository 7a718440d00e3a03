"""The sandbox's network: interfaces, routes, ARP neighbours, iptables (via pyroute2).

Everything acts inside the sandbox's network namespace: the agent's own when
it owns the machine (a guest), else the one the sandbox's holder process
made for it - stand-alone, the agent never touches the host's network.

The netlink methods block (pyroute2's synchronous IPRoute; its asyncio API
needs datagram endpoints uvloop does not offer): callers run them in a thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .command import run
from .errors import FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger("pykata.agent.network")

CLONE_NEWNET = 0x40000000
NETLINK_ROUTE = 0
_libc = ctypes.CDLL(None, use_errno=True)
IFF_UP = 0x1
RT_TABLE_MAIN = 254
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RTPROT_KERNEL = 2
FAMILIES = {0: socket.AF_INET, 1: socket.AF_INET6}  # types.IPFamily -> AF_*


@dataclass
class Address:
    family: int  # types.IPFamily: 0 v4, 1 v6
    address: str
    mask: str  # prefix length, as a string (upstream's form)


@dataclass
class Interface:
    name: str
    hw_addr: str = ""
    mtu: int = 0
    addresses: list[Address] = field(default_factory=list)
    type: str = ""
    raw_flags: int = 0
    device: str = ""


@dataclass
class Route:
    dest: str = ""  # CIDR, "" or "default" for the default route
    gateway: str = ""
    device: str = ""
    source: str = ""
    scope: int = 0
    family: int = 0
    flags: int = 0
    mtu: int = 0


@dataclass
class Neighbor:
    address: str
    device: str
    lladdr: str = ""
    state: int = 0
    flags: int = 0


def _family(address: str, what: str) -> int:
    try:
        return 1 if ipaddress.ip_address(address).version == 6 else 0
    except ValueError:
        raise InvalidArgument(f"{what} {address!r} is not an IP address") from None


def _prefix(address: Address) -> int:
    try:
        length = int(address.mask) if address.mask else (128 if address.family else 32)
        ipaddress.ip_interface(f"{address.address}/{length}")
    except ValueError:
        raise InvalidArgument(
            f"address {address.address!r} with mask {address.mask!r} is not a valid IP/prefix"
        ) from None
    return length


def _netlink_error() -> type[Exception]:
    from pyroute2.netlink.exceptions import NetlinkError

    return NetlinkError  # type: ignore[no-any-return]


def _error(exc: Exception, what: str) -> FailedPrecondition:
    return FailedPrecondition(f"{what}: {exc.args[1] if len(exc.args) > 1 else exc}")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netlink_socket_in(netns_path: str) -> socket.socket:
    """A NETLINK_ROUTE socket of the namespace at `netns_path`.

    A socket belongs to the namespace it was made in, so this thread visits
    the namespace just long enough to make it. (pyroute2's own way forks a
    helper and later signals it by pid - not something to do in an agent
    that reaps orphans.)
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        os.close(own)
        raise FailedPrecondition(
            f"the sandbox network {netns_path} is gone: {exc.strerror}"
        ) from None
    try:
        _setns(target)
        try:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


class Network:
    def __init__(self, netns_path: str | None) -> None:
        #: The namespace's /proc/<pid>/ns/net; None: the agent's own.
        self.netns_path = netns_path

    def _ipr(self) -> Any:
        from pyroute2 import IPRoute  # on first use: pyroute2 takes ~75 ms to import

        if self.netns_path is None:
            return IPRoute()
        return IPRoute(fileno=netlink_socket_in(self.netns_path).detach())

    # Netlink calls block: each runs in a worker thread, off the event loop.

    async def list_interfaces(self) -> list[Interface]:
        return await asyncio.to_thread(self._list_interfaces)

    async def update_interface(self, wanted: Interface) -> Interface:
        return await asyncio.to_thread(self._update_interface, wanted)

    async def list_routes(self) -> list[Route]:
        return await asyncio.to_thread(self._list_routes)

    async def update_routes(self, routes: list[Route]) -> list[Route]:
        return await asyncio.to_thread(self._update_routes, routes)

    async def add_neighbors(self, neighbors: list[Neighbor]) -> None:
        await asyncio.to_thread(self._add_neighbors, neighbors)

    # --- interfaces ---------------------------------------------------------------

    def _list_interfaces(self) -> list[Interface]:
        with self._ipr() as ipr:
            links = list(ipr.link("dump"))
            addrs = list(ipr.addr("dump"))
        found = []
        for link in links:
            info = link.get("IFLA_LINKINFO")
            found.append(
                Interface(
                    name=link.get("ifname"),
                    device=link.get("ifname"),
                    hw_addr=link.get("address") or "",
                    mtu=link.get("mtu") or 0,
                    type=(info.get("IFLA_INFO_KIND") if info else None) or "",
                    raw_flags=link["flags"],
                    addresses=[
                        Address(
                            1 if a["family"] == socket.AF_INET6 else 0,
                            a.get("address"),
                            str(a["prefixlen"]),
                        )
                        for a in addrs
                        if a["index"] == link["index"]
                    ],
                )
            )
        return found

    def _update_interface(self, wanted: Interface) -> Interface:
        """Name, MTU, addresses and up state of the link found by hwAddr (else by name)."""
        for address in wanted.addresses:
            _prefix(address)
        with self._ipr() as ipr:
            index = self._find_link(ipr, wanted)
            try:
                ipr.link("set", index=index, state="down")
                if wanted.name:
                    ipr.link("set", index=index, ifname=wanted.name)
                if wanted.mtu:
                    ipr.link("set", index=index, mtu=wanted.mtu)
                for old in list(ipr.addr("dump", index=index)):
                    if old.get("address", "").startswith("fe80:"):
                        continue  # the kernel's link-local address stays
                    ipr.addr(
                        "del", index=index, address=old.get("address"), prefixlen=old["prefixlen"]
                    )
                for address in wanted.addresses:
                    ipr.addr(
                        "add", index=index, address=address.address, prefixlen=_prefix(address)
                    )
                ipr.link("set", index=index, state="up")
            except _netlink_error() as exc:
                raise _error(
                    exc, f"cannot update interface {wanted.name or wanted.hw_addr}"
                ) from None
        log.info("interface updated", extra={"interface": wanted.name, "hwaddr": wanted.hw_addr})
        current = self._list_interfaces()
        return next(i for i in current if i.hw_addr == wanted.hw_addr or i.name == wanted.name)

    def _find_link(self, ipr: Any, wanted: Interface) -> int:
        links = list(ipr.link("dump"))
        for link in links:
            if wanted.hw_addr and (link.get("address") or "").lower() == wanted.hw_addr.lower():
                return int(link["index"])
        for link in links:
            if not wanted.hw_addr and link.get("ifname") in (wanted.name, wanted.device):
                return int(link["index"])
        names = ", ".join(f"{link.get('ifname')} ({link.get('address')})" for link in links)
        key = f"hwAddr {wanted.hw_addr}" if wanted.hw_addr else f"name {wanted.name!r}"
        raise NotFound(f"no interface with {key} in the sandbox; there are: {names}")

    # --- routes -------------------------------------------------------------------

    def _list_routes(self) -> list[Route]:
        with self._ipr() as ipr:
            names = {link["index"]: link.get("ifname") for link in ipr.link("dump")}
            routes = list(ipr.route("dump", table=RT_TABLE_MAIN))
        found = []
        for r in routes:
            if r["family"] not in (socket.AF_INET, socket.AF_INET6):
                continue
            dst = r.get("dst")
            metrics = r.get("RTA_METRICS")
            found.append(
                Route(
                    dest=f"{dst}/{r['dst_len']}" if dst else "",
                    gateway=r.get("gateway") or "",
                    device=names.get(r.get("oif"), ""),
                    source=r.get("prefsrc") or "",
                    scope=r["scope"],
                    family=1 if r["family"] == socket.AF_INET6 else 0,
                    flags=r["flags"],
                    mtu=(metrics.get("RTAX_MTU") if metrics else None) or 0,
                )
            )
        return found

    def _update_routes(self, routes: list[Route]) -> list[Route]:
        """Replace the main table's routes (but the kernel's own) with `routes`."""
        for route in routes:
            self._check_route(route)
        with self._ipr() as ipr:
            indexes = {link.get("ifname"): link["index"] for link in ipr.link("dump")}
            for route in routes:
                if route.device and route.device not in indexes:
                    raise NotFound(
                        f"route to {route.dest or 'default'}: no interface {route.device!r} "
                        f"in the sandbox; there are: {', '.join(sorted(indexes))}"
                    )
            existing = list(ipr.route("dump", table=RT_TABLE_MAIN))
            for r in existing:
                if r["proto"] == RTPROT_KERNEL or r["family"] not in FAMILIES.values():
                    continue
                ipr.route("del", **_route_key(r))
            # Link routes first: a gateway must be reachable before a route uses it.
            for route in sorted(routes, key=lambda r: bool(r.gateway)):
                try:
                    ipr.route("replace", **_route_args(route, indexes))
                except _netlink_error() as exc:
                    raise _error(exc, f"cannot add route {route.dest or 'default'}") from None
        log.info("routes updated", extra={"routes": len(routes)})
        return self._list_routes()

    @staticmethod
    def _check_route(route: Route) -> None:
        if route.dest and route.dest != "default":
            try:
                ipaddress.ip_network(route.dest, strict=False)
            except ValueError:
                raise InvalidArgument(f"route dest {route.dest!r} is not a network") from None
        if route.gateway:
            _family(route.gateway, "route gateway")
        if route.source:
            _family(route.source, "route source")
        if not route.device and not route.gateway:
            raise InvalidArgument(
                f"route to {route.dest or 'default'} names neither a device nor a gateway"
            )

    # --- neighbours ---------------------------------------------------------------

    def _add_neighbors(self, neighbors: Iterable[Neighbor]) -> None:
        with self._ipr() as ipr:
            indexes = {link.get("ifname"): link["index"] for link in ipr.link("dump")}
            for n in neighbors:
                _family(n.address, "ARP neighbour toIPAddress")
                if n.device not in indexes:
                    raise NotFound(f"ARP neighbour {n.address}: no interface {n.device!r}")
                args: dict[str, Any] = {"dst": n.address, "ifindex": indexes[n.device]}
                if n.lladdr:
                    args["lladdr"] = n.lladdr
                if n.state:
                    args["state"] = n.state
                if n.flags:
                    args["flags"] = n.flags
                try:
                    ipr.neigh("replace", **args)
                except _netlink_error() as exc:
                    raise _error(exc, f"cannot add ARP neighbour {n.address}") from None

    # --- iptables -----------------------------------------------------------------

    def _in_netns(self, *command: str) -> list[str]:
        if self.netns_path is None:
            return list(command)
        return ["nsenter", f"--net={self.netns_path}", "--", *command]

    async def get_iptables(self, ipv6: bool) -> bytes:
        return await run(*self._in_netns("ip6tables-save" if ipv6 else "iptables-save"))

    async def set_iptables(self, ipv6: bool, rules: bytes) -> bytes:
        tool = "ip6tables-restore" if ipv6 else "iptables-restore"
        return await run(*self._in_netns(tool), stdin=rules)


def _route_key(r: Any) -> dict[str, Any]:
    key: dict[str, Any] = {
        "family": r["family"],
        "dst_len": r["dst_len"],
        "table": RT_TABLE_MAIN,
        "priority": r.get("priority"),
    }
    if r.get("dst"):
        key["dst"] = r.get("dst")
    if r.get("oif"):
        key["oif"] = r.get("oif")
    return {k: v for k, v in key.items() if v is not None}


def _route_args(route: Route, indexes: dict[str, int]) -> dict[str, Any]:
    args: dict[str, Any] = {"table": RT_TABLE_MAIN}
    family = route.family
    if route.gateway:
        family = _family(route.gateway, "route gateway")
    if route.dest and route.dest != "default":
        network = ipaddress.ip_network(route.dest, strict=False)
        family = 1 if network.version == 6 else 0
        args["dst"] = str(network)
    args["family"] = FAMILIES[family]
    if route.gateway:
        args["gateway"] = route.gateway
    if route.device:
        args["oif"] = indexes[route.device]
    if route.source:
        args["prefsrc"] = route.source
    args["scope"] = route.scope or (RT_SCOPE_LINK if not route.gateway else RT_SCOPE_UNIVERSE)
    if route.mtu:
        args["metrics"] = {"attrs": [("RTAX_MTU", route.mtu)]}
    return args
