"""The agent's ttRPC services: thin handlers over the domain layer.

Each handler decodes its request into plain values, calls one domain
method, and encodes the answer. Domain errors carry their own status codes.
Methods not defined here answer UNIMPLEMENTED, naming the method.
"""

from __future__ import annotations

import asyncio
import signal as signals
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from .. import __version__, ocispec
from ..api import agent_pb2, csi_pb2, health_pb2, types_pb2
from ..ttrpc import Code, EncodedResponse, ServerContext, Service, TtrpcError, UnaryMethod
from ..ttrpc.frame import varint
from ..ttrpc.server import Limits, UnaryHandler, UnaryResponse
from . import cgroups, network
from .codes import upstream_code
from .copyfile import CopyRequest, SharedFiles
from .diagnostics import Diagnostics
from .errors import AgentError, ContainerNotFound, InvalidArgument, MissingField, Unsupported
from .extlimits import ExtensionLimits
from .guest import Guest
from .memagent import MemAgent
from .policy import Enforcer
from .sandbox import Sandbox, SandboxSettings
from .storage import DRIVERS, StorageSpec
from .volumes import Volumes

if TYPE_CHECKING:
    from .metrics import Metrics

#: The agent API version reported by Health/Version (upstream's value).
API_VERSION = "0.0.1"
EMPTY = Empty()


class Health:
    async def Check(
        self, request: health_pb2.CheckRequest, ctx: ServerContext
    ) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Version(
        self, request: health_pb2.CheckRequest, ctx: ServerContext
    ) -> health_pb2.VersionCheckResponse:
        return health_pb2.VersionCheckResponse(grpc_version=API_VERSION, agent_version=__version__)


def _storages(storages: list[agent_pb2.Storage]) -> list[StorageSpec]:
    return [
        StorageSpec(s.driver, s.source, s.fstype, tuple(s.options), s.mount_point) for s in storages
    ]


def _cgroup_stats(s: cgroups.CgroupStats) -> agent_pb2.CgroupStats:
    return agent_pb2.CgroupStats(
        cpu_stats=agent_pb2.CpuStats(
            cpu_usage=agent_pb2.CpuUsage(
                total_usage=s.cpu_total,
                percpu_usage=s.cpu_per_cpu,
                usage_in_usermode=s.cpu_user,
                usage_in_kernelmode=s.cpu_system,
            ),
            throttling_data=agent_pb2.ThrottlingData(
                periods=s.throttle_periods,
                throttled_periods=s.throttled_periods,
                throttled_time=s.throttled_time,
            ),
        ),
        memory_stats=agent_pb2.MemoryStats(
            cache=s.memory_cache,
            usage=agent_pb2.MemoryData(
                usage=s.memory_usage,
                max_usage=s.memory_max_usage,
                failcnt=s.memory_failcnt,
                limit=s.memory_limit,
            ),
            stats=s.memory_stat,
        ),
        pids_stats=agent_pb2.PidsStats(current=s.pids_current, limit=s.pids_limit),
    )


def _fields_set(request: Message) -> dict[str, Any]:
    """The fields a request sets (proto3 optional), by name."""
    return {field.name: value for field, value in request.ListFields()}


@dataclass
class AgentParts:
    """Everything the agent's RPCs act on."""

    sandbox: Sandbox
    guest: Guest
    files: SharedFiles
    volumes: Volumes
    memory: MemAgent
    policy: Enforcer
    diagnostics: Diagnostics
    #: Made on the first GetMetrics (prometheus_client takes ~20 ms to import).
    metrics: Metrics | None = None
    #: Called once DestroySandbox has answered (the agent as init stops there).
    after_sandbox_destroyed: Callable[[], None] | None = None


def _interface(i: network.Interface) -> types_pb2.Interface:
    return types_pb2.Interface(
        device=i.device,
        name=i.name,
        IPAddresses=[
            types_pb2.IPAddress(family=a.family, address=a.address, mask=a.mask)  # type: ignore[arg-type]
            for a in i.addresses
        ],
        mtu=i.mtu,
        hwAddr=i.hw_addr,
        type=i.type,
        raw_flags=i.raw_flags,
    )


def _route(r: network.Route) -> types_pb2.Route:
    return types_pb2.Route(
        dest=r.dest,
        gateway=r.gateway,
        device=r.device,
        source=r.source,
        scope=r.scope,
        family=r.family,  # type: ignore[arg-type]
        flags=r.flags,
        mtu=r.mtu,
    )


class AgentService:
    """grpc.AgentService; method names are the RPC names."""

    def __init__(self, parts: AgentParts) -> None:
        self.parts = parts
        self.sandbox = parts.sandbox

    # sandbox

    async def CreateSandbox(self, req: agent_pb2.CreateSandboxRequest, ctx: ServerContext) -> Empty:
        await self.sandbox.create(
            SandboxSettings(
                sandbox_id=req.sandbox_id,
                hostname=req.hostname,
                dns=list(req.dns),
                sandbox_pidns=req.sandbox_pidns,
                guest_hook_path=req.guest_hook_path,
                kernel_modules=[(m.name, list(m.parameters)) for m in req.kernel_modules],
                storages=_storages(list(req.storages)),
            )
        )
        return EMPTY

    async def DestroySandbox(
        self, req: agent_pb2.DestroySandboxRequest, ctx: ServerContext
    ) -> Empty:
        await self.sandbox.destroy()
        if self.parts.after_sandbox_destroyed is not None:
            # After this answer is sent: as PID 1, upstream's agent powers off here.
            asyncio.get_running_loop().call_soon(self.parts.after_sandbox_destroyed)
        return EMPTY

    # containers

    async def CreateContainer(
        self, req: agent_pb2.CreateContainerRequest, ctx: ServerContext
    ) -> Empty:
        if req.devices:
            raise Unsupported(f"devices ({len(req.devices)}) are not supported yet")
        if not req.HasField("OCI"):
            raise MissingField("OCI is missing: CreateContainer needs an OCI spec")
        await self.sandbox.create_container(
            req.container_id,
            req.exec_id,
            ocispec.to_json(req.OCI),
            _storages(list(req.storages)),
            sandbox_pidns=req.sandbox_pidns,
        )
        return EMPTY

    async def StartContainer(
        self, req: agent_pb2.StartContainerRequest, ctx: ServerContext
    ) -> Empty:
        await self.sandbox.container(req.container_id).start()
        return EMPTY

    async def RemoveContainer(
        self, req: agent_pb2.RemoveContainerRequest, ctx: ServerContext
    ) -> Empty:
        await self.sandbox.remove_container(req.container_id, timeout=req.timeout or None)
        return EMPTY

    async def PauseContainer(
        self, req: agent_pb2.PauseContainerRequest, ctx: ServerContext
    ) -> Empty:
        await self.sandbox.container(req.container_id).pause()
        return EMPTY

    async def ResumeContainer(
        self, req: agent_pb2.ResumeContainerRequest, ctx: ServerContext
    ) -> Empty:
        await self.sandbox.container(req.container_id).resume()
        return EMPTY

    async def UpdateContainer(
        self, req: agent_pb2.UpdateContainerRequest, ctx: ServerContext
    ) -> Empty:
        container = self.sandbox.container(req.container_id)
        if req.HasField("resources"):  # none: nothing to do, as upstream
            await container.update(ocispec.to_json(req.resources))
        return EMPTY

    async def StatsContainer(
        self, req: agent_pb2.StatsContainerRequest, ctx: ServerContext
    ) -> agent_pb2.StatsContainerResponse:
        stats = self.sandbox.container(req.container_id).stats()
        return agent_pb2.StatsContainerResponse(cgroup_stats=_cgroup_stats(stats))

    async def GetOOMEvent(
        self, req: agent_pb2.GetOOMEventRequest, ctx: ServerContext
    ) -> agent_pb2.OOMEvent:
        return agent_pb2.OOMEvent(container_id=await self.sandbox.oom.next())

    # processes

    async def ExecProcess(self, req: agent_pb2.ExecProcessRequest, ctx: ServerContext) -> Empty:
        if not req.HasField("process"):
            raise MissingField(f"process is missing for exec {req.exec_id!r}")
        await self.sandbox.container(req.container_id).exec(
            req.exec_id, ocispec.to_json(req.process)
        )
        return EMPTY

    async def SignalProcess(self, req: agent_pb2.SignalProcessRequest, ctx: ServerContext) -> Empty:
        if not 0 <= req.signal < signals.NSIG:
            raise InvalidArgument(f"signal {req.signal} is not a valid signal number")
        try:
            container = self.sandbox.container(req.container_id)
        except ContainerNotFound as exc:
            if not req.exec_id and req.signal == signals.SIGKILL:
                # Upstream's kill-everything path fails its own way (rpc.rs:635-641).
                raise TtrpcError(Code.INTERNAL, exc.message) from exc
            raise
        await container.signal(req.exec_id, req.signal)
        return EMPTY

    async def WaitProcess(
        self, req: agent_pb2.WaitProcessRequest, ctx: ServerContext
    ) -> agent_pb2.WaitProcessResponse:
        status = await self.sandbox.container(req.container_id).wait(req.exec_id)
        return agent_pb2.WaitProcessResponse(status=status)

    async def WriteStdin(
        self, req: agent_pb2.WriteStreamRequest, ctx: ServerContext
    ) -> agent_pb2.WriteStreamResponse:
        process = self.sandbox.process(req.container_id, req.exec_id)
        return agent_pb2.WriteStreamResponse(len=await process.write_stdin(req.data))

    async def ReadStdout(
        self, req: agent_pb2.ReadStreamRequest, ctx: ServerContext
    ) -> EncodedResponse:
        process = self.sandbox.process(req.container_id, req.exec_id, for_output=True)
        return read_stream_response(await process.read("stdout", req.len))

    async def ReadStderr(
        self, req: agent_pb2.ReadStreamRequest, ctx: ServerContext
    ) -> EncodedResponse:
        process = self.sandbox.process(req.container_id, req.exec_id, for_output=True)
        return read_stream_response(await process.read("stderr", req.len))

    async def CloseStdin(self, req: agent_pb2.CloseStdinRequest, ctx: ServerContext) -> Empty:
        await self.sandbox.process(req.container_id, req.exec_id).close_stdin()
        return EMPTY

    async def TtyWinResize(self, req: agent_pb2.TtyWinResizeRequest, ctx: ServerContext) -> Empty:
        process = self.sandbox.process(req.container_id, req.exec_id)
        process.resize(req.row, req.column)
        return EMPTY

    # guest

    async def GetGuestDetails(
        self, req: agent_pb2.GuestDetailsRequest, ctx: ServerContext
    ) -> agent_pb2.GuestDetailsResponse:
        seccomp = await self.sandbox.runtime_supports_seccomp()
        details = self.parts.guest.details(list(DRIVERS), seccomp)
        return agent_pb2.GuestDetailsResponse(
            mem_block_size_bytes=details.mem_block_size if req.mem_block_size else 0,
            support_mem_hotplug_probe=details.mem_hotplug_probe if req.mem_hotplug_probe else False,
            agent_details=agent_pb2.AgentDetails(
                version=details.version,
                init_daemon=details.init_daemon,
                device_handlers=[],
                storage_handlers=details.storage_handlers,
                supports_seccomp=details.supports_seccomp,
                extra_features=["policy", "debug_console", "log_port", "copy_file_atomic"],
            ),
        )

    async def OnlineCPUMem(self, req: agent_pb2.OnlineCPUMemRequest, ctx: ServerContext) -> Empty:
        await self.parts.guest.online_cpu_mem(req.nb_cpus, req.cpu_only, req.wait)
        return EMPTY

    async def MemHotplugByProbe(
        self, req: agent_pb2.MemHotplugByProbeRequest, ctx: ServerContext
    ) -> Empty:
        self.parts.guest.hotplug_by_probe(list(req.memHotplugProbeAddr))
        return EMPTY

    async def SetGuestDateTime(
        self, req: agent_pb2.SetGuestDateTimeRequest, ctx: ServerContext
    ) -> Empty:
        self.parts.guest.set_date_time(req.Sec, req.Usec)
        return EMPTY

    async def ReseedRandomDev(
        self, req: agent_pb2.ReseedRandomDevRequest, ctx: ServerContext
    ) -> Empty:
        self.parts.guest.reseed_random(req.data)
        return EMPTY

    async def AddSwap(self, req: agent_pb2.AddSwapRequest, ctx: ServerContext) -> Empty:
        await self.parts.guest.add_swap_device(list(req.PCIPath))
        return EMPTY

    async def AddSwapPath(self, req: agent_pb2.AddSwapPathRequest, ctx: ServerContext) -> Empty:
        await self.parts.guest.add_swap_path(req.path)
        return EMPTY

    async def CopyFile(self, req: agent_pb2.CopyFileRequest, ctx: ServerContext) -> Empty:
        self.parts.files.copy(
            CopyRequest(
                path=req.path,
                file_size=req.file_size,
                file_mode=req.file_mode,
                dir_mode=req.dir_mode,
                uid=req.uid,
                gid=req.gid,
                offset=req.offset,
                data=req.data,
            )
        )
        return EMPTY

    async def MemAgentMemcgSet(
        self, req: agent_pb2.MemAgentMemcgConfig, ctx: ServerContext
    ) -> Empty:
        self.parts.memory.set_memcg(_fields_set(req))
        return EMPTY

    async def MemAgentCompactSet(
        self, req: agent_pb2.MemAgentCompactConfig, ctx: ServerContext
    ) -> Empty:
        self.parts.memory.set_compact(_fields_set(req))
        return EMPTY

    async def GetDiagnosticData(
        self, req: agent_pb2.GetDiagnosticDataRequest, ctx: ServerContext
    ) -> agent_pb2.GetDiagnosticDataResponse:
        data = await self.parts.diagnostics.data(req.log_type, req.container_id)
        return agent_pb2.GetDiagnosticDataResponse(data=data)

    # volumes

    async def GetVolumeStats(
        self, req: agent_pb2.VolumeStatsRequest, ctx: ServerContext
    ) -> csi_pb2.VolumeStatsResponse:
        stats = self.parts.volumes.stats(req.volume_guest_path)
        return csi_pb2.VolumeStatsResponse(
            usage=[
                csi_pb2.VolumeUsage(
                    total=stats.bytes_total,
                    used=stats.bytes_used,
                    available=stats.bytes_available,
                    unit=csi_pb2.VolumeUsage.BYTES,
                ),
                csi_pb2.VolumeUsage(
                    total=stats.inodes_total,
                    used=stats.inodes_used,
                    available=stats.inodes_available,
                    unit=csi_pb2.VolumeUsage.INODES,
                ),
            ],
            volume_condition=csi_pb2.VolumeCondition(abnormal=False, message="ok"),
        )

    async def ResizeVolume(self, req: agent_pb2.ResizeVolumeRequest, ctx: ServerContext) -> Empty:
        await self.parts.volumes.resize(req.volume_guest_path, req.size)
        return EMPTY

    async def UpdateEphemeralMounts(
        self, req: agent_pb2.UpdateEphemeralMountsRequest, ctx: ServerContext
    ) -> Empty:
        await self.sandbox.storages.update_ephemeral(_storages(list(req.storages)))
        return EMPTY

    async def RemoveStaleVirtiofsShareMounts(
        self, req: agent_pb2.RemoveStaleVirtiofsShareMountsRequest, ctx: ServerContext
    ) -> Empty:
        await self.parts.volumes.remove_stale_shares()
        return EMPTY

    # network

    async def ListInterfaces(
        self, req: agent_pb2.ListInterfacesRequest, ctx: ServerContext
    ) -> agent_pb2.Interfaces:
        found = await self.sandbox.network.list_interfaces()
        return agent_pb2.Interfaces(Interfaces=[_interface(i) for i in found])

    async def UpdateInterface(
        self, req: agent_pb2.UpdateInterfaceRequest, ctx: ServerContext
    ) -> types_pb2.Interface:
        if not req.HasField("interface"):
            raise MissingField("UpdateInterface needs an interface")
        i = req.interface
        if not i.hwAddr and not i.name:
            raise InvalidArgument("interface needs a hwAddr (or a name) to find the link")
        wanted = network.Interface(
            name=i.name,
            device=i.device,
            hw_addr=i.hwAddr,
            mtu=i.mtu,
            addresses=[network.Address(a.family, a.address, a.mask) for a in i.IPAddresses],
        )
        return _interface(await self.sandbox.network.update_interface(wanted))

    async def ListRoutes(
        self, req: agent_pb2.ListRoutesRequest, ctx: ServerContext
    ) -> agent_pb2.Routes:
        routes = await self.sandbox.network.list_routes()
        return agent_pb2.Routes(Routes=[_route(r) for r in routes])

    async def UpdateRoutes(
        self, req: agent_pb2.UpdateRoutesRequest, ctx: ServerContext
    ) -> agent_pb2.Routes:
        if not req.HasField("routes"):
            raise MissingField("UpdateRoutes needs routes (an empty list removes them all)")
        wanted = [
            network.Route(r.dest, r.gateway, r.device, r.source, r.scope, r.family, r.flags, r.mtu)
            for r in req.routes.Routes
        ]
        routes = await self.sandbox.network.update_routes(wanted)
        return agent_pb2.Routes(Routes=[_route(r) for r in routes])

    async def AddARPNeighbors(
        self, req: agent_pb2.AddARPNeighborsRequest, ctx: ServerContext
    ) -> Empty:
        if not req.HasField("neighbors"):
            raise MissingField("AddARPNeighbors needs neighbors")
        neighbors = [
            network.Neighbor(n.toIPAddress.address, n.device, n.lladdr, n.state, n.flags)
            for n in req.neighbors.ARPNeighbors
        ]
        await self.sandbox.network.add_neighbors(neighbors)
        return EMPTY

    async def GetIPTables(
        self, req: agent_pb2.GetIPTablesRequest, ctx: ServerContext
    ) -> agent_pb2.GetIPTablesResponse:
        rules = await self.sandbox.network.get_iptables(req.is_ipv6)
        return agent_pb2.GetIPTablesResponse(data=rules)

    async def SetIPTables(
        self, req: agent_pb2.SetIPTablesRequest, ctx: ServerContext
    ) -> agent_pb2.SetIPTablesResponse:
        output = await self.sandbox.network.set_iptables(req.is_ipv6, req.data)
        return agent_pb2.SetIPTablesResponse(data=output)

    # metrics and policy

    async def GetMetrics(
        self, req: agent_pb2.GetMetricsRequest, ctx: ServerContext
    ) -> agent_pb2.Metrics:
        if self.parts.metrics is None:
            from .metrics import Metrics

            self.parts.metrics = Metrics()
        return agent_pb2.Metrics(metrics=self.parts.metrics.text())

    async def SetPolicy(self, req: agent_pb2.SetPolicyRequest, ctx: ServerContext) -> Empty:
        self.parts.policy.replace(req.policy, "SetPolicy")
        return EMPTY


def read_stream_response(data: bytes) -> EncodedResponse:
    """ReadStreamResponse(data=data) as protobuf encodes it (field 1, length-delimited):
    the output is written to the socket as it was read, not copied into a message
    and out of it."""
    if not data:
        return EncodedResponse()
    return EncodedResponse(b"\x0a" + varint(len(data)), data)


def health_service() -> Service:
    return Service.from_descriptor(health_pb2.DESCRIPTOR.services_by_name["Health"], Health())


def _answering_upstream_codes(rpc: str, handler: UnaryHandler) -> UnaryHandler:
    async def handle(request: Any, ctx: ServerContext) -> UnaryResponse:
        try:
            return await handler(request, ctx)
        except AgentError as exc:
            code = upstream_code(rpc, exc)
            if code == exc.code:
                raise
            raise TtrpcError(code, exc.message) from exc

    return handle


def agent_service(parts: AgentParts) -> Service:
    """grpc.AgentService, failing with the codes upstream's agent answers (codes.py)."""
    service = Service.from_descriptor(
        agent_pb2.DESCRIPTOR.services_by_name["AgentService"], AgentService(parts)
    )
    for rpc, method in service.methods.items():
        assert isinstance(method, UnaryMethod)
        handler = _answering_upstream_codes(rpc, method.handler)
        service.methods[rpc] = UnaryMethod(method.request_type, handler)
    return service


def services(
    parts: AgentParts,
    limits: Limits | None = None,
    extension_limits: ExtensionLimits | None = None,
) -> list[Service]:
    """The upstream services, and pykata.Extensions (extensions.py) next to them."""
    from .extensions import extensions_service

    return [
        health_service(),
        agent_service(parts),
        extensions_service(parts, limits or Limits(), extension_limits),
    ]
