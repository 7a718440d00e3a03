"""The agent's ttRPC services: thin handlers over the domain layer.

grpc.Health is complete. grpc.AgentService has no handlers yet: the server
answers each of its methods UNIMPLEMENTED, naming the method, until the
domain code behind it lands.
"""

from __future__ import annotations

from .. import __version__
from ..api import agent_pb2, health_pb2
from ..ttrpc import ServerContext, Service

#: The agent API version reported by Health/Version (upstream's value).
API_VERSION = "0.0.1"


class Health:
    async def Check(
        self, request: health_pb2.CheckRequest, ctx: ServerContext
    ) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Version(
        self, request: health_pb2.CheckRequest, ctx: ServerContext
    ) -> health_pb2.VersionCheckResponse:
        return health_pb2.VersionCheckResponse(grpc_version=API_VERSION, agent_version=__version__)


class AgentService:
    """grpc.AgentService handlers; each later issue adds its methods here."""


def services() -> list[Service]:
    return [
        Service.from_descriptor(health_pb2.DESCRIPTOR.services_by_name["Health"], Health()),
        Service.from_descriptor(
            agent_pb2.DESCRIPTOR.services_by_name["AgentService"], AgentService()
        ),
    ]
