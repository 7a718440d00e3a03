"""The agent's ttRPC services: thin handlers over the domain layer.

Each handler decodes its request into plain values, calls one domain
method, and encodes the answer. Domain errors carry their own status codes.
Methods not defined here answer UNIMPLEMENTED, naming the method.
"""

from __future__ import annotations

import signal as signals

from google.protobuf.empty_pb2 import Empty

from .. import __version__
from ..api import agent_pb2, health_pb2
from ..ttrpc import ServerContext, Service
from . import cgroups, oci
from .errors import InvalidArgument, Unsupported
from .sandbox import Sandbox, SandboxSettings
from .storage import StorageSpec

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


class AgentService:
    """grpc.AgentService; method names are the RPC names."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

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
        return EMPTY

    # containers

    async def CreateContainer(
        self, req: agent_pb2.CreateContainerRequest, ctx: ServerContext
    ) -> Empty:
        if req.devices:
            raise Unsupported(f"devices ({len(req.devices)}) are not supported yet")
        if not req.HasField("OCI"):
            raise InvalidArgument("OCI is missing: CreateContainer needs an OCI spec")
        container = await self.sandbox.create_container(
            req.container_id, oci.to_json(req.OCI), _storages(list(req.storages))
        )
        container.init_exec_id = req.exec_id
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
        await self.sandbox.container(req.container_id).update(oci.to_json(req.resources))
        return EMPTY

    async def StatsContainer(
        self, req: agent_pb2.StatsContainerRequest, ctx: ServerContext
    ) -> agent_pb2.StatsContainerResponse:
        container = self.sandbox.container(req.container_id)
        return agent_pb2.StatsContainerResponse(cgroup_stats=cgroups.stats(container.cgroup))

    async def GetOOMEvent(
        self, req: agent_pb2.GetOOMEventRequest, ctx: ServerContext
    ) -> agent_pb2.OOMEvent:
        return agent_pb2.OOMEvent(container_id=await self.sandbox.oom.next())

    # processes

    async def ExecProcess(self, req: agent_pb2.ExecProcessRequest, ctx: ServerContext) -> Empty:
        if not req.HasField("process"):
            raise InvalidArgument(f"process is missing for exec {req.exec_id!r}")
        await self.sandbox.container(req.container_id).exec(req.exec_id, oci.to_json(req.process))
        return EMPTY

    async def SignalProcess(self, req: agent_pb2.SignalProcessRequest, ctx: ServerContext) -> Empty:
        if not 0 < req.signal < signals.NSIG:
            raise InvalidArgument(f"signal {req.signal} is not a valid signal number")
        await self.sandbox.container(req.container_id).signal(req.exec_id, req.signal)
        return EMPTY

    async def WaitProcess(
        self, req: agent_pb2.WaitProcessRequest, ctx: ServerContext
    ) -> agent_pb2.WaitProcessResponse:
        status = await self.sandbox.container(req.container_id).wait(req.exec_id)
        return agent_pb2.WaitProcessResponse(status=status)

    async def WriteStdin(
        self, req: agent_pb2.WriteStreamRequest, ctx: ServerContext
    ) -> agent_pb2.WriteStreamResponse:
        process = self.sandbox.container(req.container_id).process(req.exec_id)
        return agent_pb2.WriteStreamResponse(len=await process.write_stdin(req.data))

    async def ReadStdout(
        self, req: agent_pb2.ReadStreamRequest, ctx: ServerContext
    ) -> agent_pb2.ReadStreamResponse:
        process = self.sandbox.container(req.container_id).process(req.exec_id)
        return agent_pb2.ReadStreamResponse(data=await process.read("stdout", req.len))

    async def ReadStderr(
        self, req: agent_pb2.ReadStreamRequest, ctx: ServerContext
    ) -> agent_pb2.ReadStreamResponse:
        process = self.sandbox.container(req.container_id).process(req.exec_id)
        return agent_pb2.ReadStreamResponse(data=await process.read("stderr", req.len))

    async def CloseStdin(self, req: agent_pb2.CloseStdinRequest, ctx: ServerContext) -> Empty:
        await self.sandbox.container(req.container_id).process(req.exec_id).close_stdin()
        return EMPTY

    async def TtyWinResize(self, req: agent_pb2.TtyWinResizeRequest, ctx: ServerContext) -> Empty:
        process = self.sandbox.container(req.container_id).process(req.exec_id)
        process.resize(req.row, req.column)
        return EMPTY


def health_service() -> Service:
    return Service.from_descriptor(health_pb2.DESCRIPTOR.services_by_name["Health"], Health())


def services(sandbox: Sandbox) -> list[Service]:
    return [
        health_service(),
        Service.from_descriptor(
            agent_pb2.DESCRIPTOR.services_by_name["AgentService"], AgentService(sandbox)
        ),
    ]
